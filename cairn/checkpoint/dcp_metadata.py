"""DCP's ``.metadata`` read without running code from it, and checked against the files it names.

Stock DCP unpickles ``.metadata`` with ``pickle.load``: a crafted file runs its payload. Here
it goes through an allowlist unpickler that resolves only the classes DCP's metadata is made
of (its dataclasses, ``torch.Size``, dtypes, layouts, paths); any other global is refused
before it is imported, so a payload never runs. What it declares is then checked before
anything trusts it: every item names a plain file inside the step, with an offset and a
length that are non-negative integers (``metadata_problems``), and, against the real files,
lies inside its file (``check_dcp_structure``, and the readers before any read).
"""

from __future__ import annotations

import importlib
import io
import math
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint.metadata as metadata_module
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorStorageMetadata,
)

from cairn.checkpoint.errors import CheckpointError, UnsafeCheckpointError, corrupt_error
from cairn.checkpoint.fsio import NotRegularFileError, read_regular, regular_file_stat
from cairn.checkpoint.layout import MANIFEST_NAME, METADATA_NAME, SAVE_ID_PREFIX
from cairn.checkpoint.manifest import plain_file_name

_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_PATH_CLASSES = frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"})
# module -> names a DCP .metadata may reference. Also admitted (see find_class): any class
# defined in DCP's metadata module (its plain dataclasses and enums, including ones a later
# torch adds) and, from ``torch``, dtypes and layouts by value.
_ALLOWED_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset"}),
    "copyreg": frozenset({"_reconstructor"}),
    "pathlib": _PATH_CLASSES,
    "pathlib._local": _PATH_CLASSES,  # where Python 3.13+ pickles its paths
}
# The metadata of a 405B model with optimizer state is tens of MB: a file past this is not metadata.
MAX_METADATA_BYTES = 2 << 30


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; refuses every global outside ``_ALLOWED_GLOBALS``."""

    def find_class(self, module: str, name: str) -> Any:
        if module == _DCP_METADATA_MODULE:
            value = getattr(metadata_module, name, None)
            if isinstance(value, type) and value.__module__ == _DCP_METADATA_MODULE:
                return value
        elif module == "torch" and name not in _ALLOWED_GLOBALS["torch"]:
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout)):
                return value
        elif name in _ALLOWED_GLOBALS.get(module, ()):
            if module == "pathlib._local":
                module = "pathlib"  # a file from Python 3.13+ read on an older Python
            return getattr(importlib.import_module(module), name)
        raise UnsafeCheckpointError(f"it references {module}.{name}, which DCP metadata never contains")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("it holds a persistent reference, which DCP metadata never contains")


def load_metadata_bytes(raw: bytes, where: str | os.PathLike) -> Metadata:
    """DCP metadata from the bytes of ``where`` without running code from them; the errors name ``where``."""
    step_where = os.path.dirname(os.fspath(where)) or os.fspath(where)
    try:
        metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"refusing to load {where}: {e}; the file is crafted or not DCP metadata. "
                                    "Nothing from it was run") from None
    except Exception as e:  # truncated or garbled pickles raise a zoo of types
        raise corrupt_error(step_where, [f"{where}: unreadable DCP metadata ({type(e).__name__}: {e})"]) from None
    problems = metadata_problems(metadata, where)
    if problems:
        raise corrupt_error(step_where, problems)
    return metadata


def load_metadata_file(path: str | os.PathLike) -> Metadata:
    """DCP metadata from ``path`` without running code from it; CheckpointError names the file."""
    path = Path(path)
    try:
        raw = read_regular(path, limit=MAX_METADATA_BYTES)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {path.parent} is not a DCP checkpoint, or its save never "
                              "finished") from None
    except CheckpointError as e:
        raise corrupt_error(path.parent, [str(e)]) from None
    return load_metadata_bytes(raw, path)


def metadata_problems(metadata: Any, where: str | os.PathLike) -> list[str]:
    """What makes unpickled metadata unusable before any file is looked at."""
    if not isinstance(metadata, Metadata):
        return [f"{where}: holds a {type(metadata).__name__}, not DCP Metadata"]
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
        return [f"{where}: DCP metadata without its state_dict_metadata/storage_data tables"]
    problems = []
    for index, info in metadata.storage_data.items():
        relative_path = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        # A crafted entry could point outside the checkpoint (``../../etc/passwd``).
        if not plain_file_name(relative_path) or relative_path in (MANIFEST_NAME, METADATA_NAME):
            problems.append(f"{where}: item {getattr(index, 'fqn', index)!r} points to an invalid file name "
                            f"{relative_path!r}")
        elif not (type(offset) is int and type(length) is int and offset >= 0 and length >= 0):
            problems.append(f"{where}: item {index.fqn!r} has an invalid offset/length ({offset!r}, {length!r})")
    if not problems:
        for fqn, item in metadata.state_dict_metadata.items():
            if isinstance(item, TensorStorageMetadata):
                problems += _tensor_problems(fqn, item, metadata.storage_data, where)
    return problems


def _tensor_problems(fqn: str, item: TensorStorageMetadata, storage_data: dict, where) -> list[str]:
    """A tensor's declared shape against its chunks and their stored bytes: a crafted shape
    would make a reader allocate what no file holds. The chunks must lie inside the tensor and
    cover exactly its elements (DCP's own rule when it plans a save), and no chunk may claim
    more bytes than its stored item has (unless a transform, e.g. compression, stored it)."""
    size, dtype = getattr(item, "size", None), getattr(getattr(item, "properties", None), "dtype", None)
    if not _sizes(size) or not isinstance(dtype, torch.dtype):
        return [f"{where}: {fqn!r} has an invalid shape or dtype ({size!r}, {dtype!r})"]
    covered = 0
    for chunk in item.chunks if isinstance(item.chunks, list) else [None]:
        offsets, sizes = getattr(chunk, "offsets", None), getattr(chunk, "sizes", None)
        if not (_sizes(offsets) and _sizes(sizes) and len(offsets) == len(sizes) == len(size)) \
                or any(o + n > dim for o, n, dim in zip(offsets, sizes, size)):
            return [f"{where}: {fqn!r} of shape {list(size)} has a chunk outside it ({offsets!r}, {sizes!r})"]
        covered += math.prod(sizes)
        info = storage_data.get(MetadataIndex(fqn, offsets))
        stored = getattr(info, "length", None)
        if type(stored) is int and not getattr(info, "transform_descriptors", None) \
                and math.prod(sizes) * dtype.itemsize > stored:
            return [f"{where}: {fqn!r} declares a chunk of {math.prod(sizes) * dtype.itemsize} bytes stored in "
                    f"{stored} (the metadata was damaged or crafted)"]
    if covered != math.prod(size):
        return [f"{where}: {fqn!r} declares shape {list(size)} ({math.prod(size)} elements), its chunks hold "
                f"{covered} (the metadata was damaged or crafted)"]
    return []


def _sizes(values: Any) -> bool:
    return isinstance(values, (tuple, list)) and len(values) <= 64 and \
        all(type(v) is int and v >= 0 for v in values)


def written_by_cairn(metadata: Metadata) -> bool:
    save_id = getattr(getattr(metadata, "storage_meta", None), "save_id", None)
    return isinstance(save_id, str) and save_id.startswith(SAVE_ID_PREFIX)


def save_id_of(metadata: Metadata) -> str | None:
    """The cairn save id recorded in the metadata (None for a stock DCP save)."""
    save_id = getattr(getattr(metadata, "storage_meta", None), "save_id", None)
    return save_id if written_by_cairn(metadata) else None


def out_of_bounds(name: str, fqn: str, offset: int, length: int, size: int, where: str | os.PathLike) -> str | None:
    """A message if bytes ``offset .. offset + length`` do not lie inside a file of ``size`` bytes."""
    if offset + length <= size:
        return None
    return (f"{where}: item {fqn!r} claims bytes {offset}..{offset + length} of {name}, which has {size} bytes "
            "(the metadata was damaged or crafted)")


def coverage_gap(item: TensorStorageMetadata) -> tuple[int, list[int]]:
    """(elements of the tensor that no stored chunk holds, indices along dim 0 not wholly held).

    DCP writes each element once (replicas are deduplicated, shards do not overlap), so the
    chunks' volumes add up to the tensor's unless a rank's part was never written.
    """
    size = tuple(item.size)
    total = math.prod(size)
    covered = sum(math.prod(chunk.sizes) for chunk in item.chunks)
    if covered >= total or not size:
        return 0, []
    per_row = total // size[0]
    rows = [0] * size[0]
    for chunk in item.chunks:
        row_volume = math.prod(chunk.sizes[1:])
        for row in range(chunk.offsets[0], min(size[0], chunk.offsets[0] + chunk.sizes[0])):
            rows[row] += row_volume
    return total - covered, [row for row, held in enumerate(rows) if held < per_row]


def index_ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def grouped_record(manifest: dict | None) -> dict[str, tuple[str, int]]:
    """{key: (group, members)} of the grouped tensors a manifest records (an MoE's experts: dim 0
    indexes ``members`` experts); see ``CheckpointManager``."""
    out: dict[str, tuple[str, int]] = {}
    for name, group in ((manifest or {}).get("grouped") or {}).items():
        if isinstance(group, dict) and isinstance(group.get("size"), int):
            out.update({key: (name, group["size"]) for key in group.get("keys") or [] if isinstance(key, str)})
    return out


def tensor_problems(metadata: Metadata, where: str | os.PathLike, manifest: dict | None = None) -> list[str]:
    """Tensors a load would leave partly unwritten (a chunk never stored), and grouped tensors the
    manifest records that are missing or have lost members; each names the key."""
    groups = grouped_record(manifest)
    saved = metadata.state_dict_metadata
    problems = []
    for key, item in saved.items():
        if not isinstance(item, TensorStorageMetadata):
            continue
        try:
            missing, rows = coverage_gap(item)
        except (AttributeError, TypeError, ValueError, IndexError):  # a damaged or crafted chunk table
            problems.append(f"{where}: {key!r}: its chunk table is unreadable (the metadata was damaged or crafted)")
            continue
        if missing:
            name = groups.get(key, ("rows",))[0]
            problems.append(f"{where}: {key!r}: {missing} of {math.prod(item.size)} elements are in no stored chunk "
                            f"({name} {index_ranges(rows)} missing)")
    for key, (name, members) in groups.items():
        item = saved.get(key)
        if not isinstance(item, TensorStorageMetadata):
            problems.append(f"{where}: {key!r} is missing: the manifest records it as one of {len(groups)} tensors "
                            f"of {members} {name}")
        elif not getattr(item, "size", None) or item.size[0] != members:
            problems.append(f"{where}: {key!r} holds {item.size[0] if item.size else 0} {name} where {members} "
                            "were saved")
    return problems


def check_dcp_structure(step_dir: str | os.PathLike, manifest_expected: bool = False,
                        manifest: dict | None = None) -> list[str]:
    """Problems in a DCP dir's structure: unsafe/unreadable ``.metadata``, items outside their files,
    tensors with chunks never stored, grouped tensors (experts) the ``manifest`` records but the
    metadata lacks.

    ``manifest_expected``: the dir has no manifest; report that if cairn wrote the metadata.
    """
    step_dir = Path(step_dir)
    try:
        metadata = load_metadata_file(step_dir / METADATA_NAME)
    except CheckpointError as e:
        return list(getattr(e, "problems", None) or [str(e)])
    problems = []
    if manifest_expected and written_by_cairn(metadata):
        problems.append(f"{step_dir / MANIFEST_NAME}: missing (cairn wrote this step, with a manifest)")
    sizes: dict[str, int | None] = {}
    for index, info in metadata.storage_data.items():
        name = info.relative_path
        if name not in sizes:
            try:
                sizes[name] = regular_file_stat(step_dir / name).st_size
            except FileNotFoundError:
                sizes[name] = None
                problems.append(f"{step_dir / name}: missing (DCP metadata points to it)")
            except NotRegularFileError as e:
                sizes[name] = None
                problems.append(str(e))
        if sizes[name] is not None:
            problem = out_of_bounds(name, index.fqn, info.offset, info.length, sizes[name], step_dir / name)
            if problem is not None:
                problems.append(problem)
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            indexes = [MetadataIndex(fqn, chunk.offsets) for chunk in item.chunks]
        elif isinstance(item, BytesStorageMetadata):
            indexes = [MetadataIndex(fqn)]
        else:
            continue
        if any(index not in metadata.storage_data for index in indexes):
            problems.append(f"{step_dir / METADATA_NAME}: {fqn!r} has no stored data")
    return problems + tensor_problems(metadata, step_dir / METADATA_NAME, manifest)
