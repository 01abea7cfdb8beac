"""Reading any checkpoint without running code from it: DCP steps, Hugging Face dirs, ``.pt`` files.

One reader per format (``open_checkpoint`` picks it), each listing its keys (``entries``) and
reading values by key (``read``): DCP metadata goes through cairn's allowlist unpickler and
non-tensor values through ``torch.load(weights_only=True)``, safetensors through their JSON
headers, ``.pt`` files with ``weights_only=True``. ``cairn checkpoint`` and the converters
(``cairn.checkpoint.convert``) share them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import pickle
import re
import sys
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from tqdm import tqdm

from cairn.checkpoint.api import single_process_dcp
from cairn.checkpoint.errors import (
    CheckFailed,
    CheckpointError,
    CorruptCheckpointError,
    UsageError,
    first_line,
    reraise_user_error,
)
from cairn.checkpoint.fsio import display_path, is_hf_dir
from cairn.checkpoint.hf import HFWeights, natural_order, read_hf_config
from cairn.checkpoint.adapter import hf_sources
from cairn.checkpoint.layout import GROUPS, MANIFEST_NAME, METADATA_NAME, staging_step, step_of
from cairn.checkpoint.manifest import read_manifest
from cairn.checkpoint.reader import CachedMetadataReader, SafeLoadPlanner, weights_only_refusal
from cairn.checkpoint.dcp_metadata import check_dcp_structure, load_metadata_file, tensor_problems
from cairn.models import get_model_spec

# Bytes of tensors read per side in one DCP read during diff/convert: bounds memory, keeps reads few.
READ_BATCH_BYTES = 256 << 20


@dataclasses.dataclass
class Entry:
    """One key of a checkpoint: a tensor (shape, dtype) or another value (stored bytes only)."""

    key: str
    is_tensor: bool
    shape: tuple[int, ...] | None = None
    dtype: Any = None  # torch.dtype
    num_bytes: int = 0
    files: list[str] = dataclasses.field(default_factory=list)

    @property
    def group(self) -> str:
        return group_of(self.key)


def group_of(key: str) -> str:
    """The state a key belongs to: one of GROUPS (model FQNs sit at the top level)."""
    head = key.split(".", 1)[0]
    return head if head in GROUPS[1:] else "model"


def is_step_folder(path: Path) -> bool:
    """A folder holding ``step-N`` (or leftover ``.tmp-step-N``) directories."""
    if not path.is_dir():
        return False
    return any((step_of(p.name) is not None or staging_step(p.name) is not None) and p.is_dir()
               for p in path.iterdir())


def detect_format(path: Path) -> str:
    """"dcp", "hf" or "torch" for a checkpoint path; UsageError for anything else."""
    if not path.exists():
        raise UsageError("no such file or directory", path)
    if path.is_file():
        if path.suffix == ".safetensors":
            raise UsageError("a single safetensors file: pass the directory that holds it", path)
        if zipfile.is_zipfile(path) or path.suffix in (".pt", ".pth", ".bin"):
            return "torch"
        raise UsageError("not a checkpoint: expected a step directory, a Hugging Face directory or a .pt file",
                         path)
    if (path / METADATA_NAME).exists():
        return "dcp"
    if is_hf_dir(path):
        return "hf"
    if (path / MANIFEST_NAME).is_file():  # a cairn step whose data files went missing: readers say what
        with contextlib.suppress(OSError, ValueError):
            if json.loads((path / MANIFEST_NAME).read_text()).get("storage") == "hf":
                return "hf"
        return "dcp"
    if is_step_folder(path) or is_step_folder(path / "checkpoint"):
        folder = path if is_step_folder(path) else path / "checkpoint"
        raise UsageError(f"a checkpoint folder, not a step: pick one of its steps (`cairn checkpoint ls "
                         f"{display_path(folder)}`)", path)
    raise UsageError("not a checkpoint: no .metadata, cairn_manifest.json or *.safetensors", path)


def read_manifest_quietly(path: Path) -> tuple[dict | None, list[str]]:
    """(manifest or None, problems): a damaged manifest is reported, not raised."""
    try:
        return read_manifest(path), []
    except CorruptCheckpointError as e:
        return None, list(e.problems) or [str(e)]


class DcpCheckpoint:
    """A DCP step folder: keys from its metadata (read safely), values with ``dcp.load`` (no process group)."""

    format = "dcp"

    def __init__(self, path: Path, *, tolerate_corrupt: bool = False):
        self.path = path
        self.manifest, self.problems = read_manifest_quietly(path)
        self.reader = CachedMetadataReader(path)
        try:
            self.metadata = self.reader.read_metadata()
        except CorruptCheckpointError as e:
            if not tolerate_corrupt:
                raise
            self.problems = list(e.problems) or [str(e)]
            self.metadata = load_metadata_file(path / METADATA_NAME)  # still never unpickles code
        # items that lie outside their files (crafted or damaged metadata), before anything is read
        self.problems += [p for p in check_dcp_structure(path) if p not in self.problems and "claims bytes" in p]
        # tensors with chunks never stored, grouped tensors (experts) lost since the manifest counted them
        self.problems += [p for p in tensor_problems(self.metadata, path / METADATA_NAME, self.manifest)
                          if p not in self.problems]
        if self.problems and not tolerate_corrupt:
            raise CorruptCheckpointError(f"checkpoint {path} is corrupt: {self.problems[0]}", self.problems)
        self._entries: dict[str, Entry] | None = None

    @classmethod
    def from_reader(cls, label: str, reader, manifest: dict | None, problems: Iterable[str] = ()) -> DcpCheckpoint:
        """A step read through another store's reader (an ``s3://`` step); ``label`` names it."""
        ckpt = cls.__new__(cls)
        ckpt.path, ckpt.reader, ckpt.manifest, ckpt.problems = label, reader, manifest, list(problems)
        ckpt.metadata = reader.read_metadata()
        ckpt.problems += tensor_problems(ckpt.metadata, f"{label}/{METADATA_NAME}", manifest)
        ckpt._entries = None
        return ckpt

    def entries(self) -> dict[str, Entry]:
        if self._entries is None:
            files: dict[str, set[str]] = {}
            stored: dict[str, int] = {}
            for index, info in self.metadata.storage_data.items():
                files.setdefault(index.fqn, set()).add(info.relative_path)
                stored[index.fqn] = stored.get(index.fqn, 0) + int(info.length)
            self._entries = {}
            for key, item in self.metadata.state_dict_metadata.items():
                if isinstance(item, TensorStorageMetadata):
                    shape, dtype = tuple(item.size), item.properties.dtype
                    entry = Entry(key, True, shape, dtype, math.prod(shape) * dtype.itemsize)
                else:
                    entry = Entry(key, False, num_bytes=stored.get(key, 0))
                entry.files = sorted(files.get(key, ()), key=file_order)
                self._entries[key] = entry
        return self._entries

    def read(self, keys: Iterable[str], into: dict[str, Any] | None = None) -> dict[str, Any]:
        """Values of ``keys`` (flat DCP keys); tensors land in ``into``'s tensors when given."""
        entries = self.entries()
        state = {}
        for key in keys:
            entry = entries[key]
            if into is not None and key in into:
                state[key] = into[key]
            else:
                state[key] = torch.empty(entry.shape, dtype=entry.dtype) if entry.is_tensor else None
        try:
            with single_process_dcp():
                dcp.load(state, storage_reader=self.reader, planner=SafeLoadPlanner(), no_dist=True)
        except BaseException as e:
            reraise_user_error(e, self.reader)
        return state


class HfCheckpoint:
    """A Hugging Face directory: keys and shapes from the safetensors headers, tensors with safe_open."""

    format = "hf"

    def __init__(self, path: Path):
        self.path = path
        self.manifest, self.problems = read_manifest_quietly(path)
        self.weights = HFWeights(path)
        self.config = read_hf_config(path)

    def entries(self) -> dict[str, Entry]:
        weights = self.weights
        return {key: Entry(key, True, weights.shapes[key], weights.dtypes[key],
                           math.prod(weights.shapes[key]) * weights.dtypes[key].itemsize, [weights.files[key].name])
                for key in natural_order(weights.shapes)}

    def read(self, keys: Iterable[str], into: dict[str, Any] | None = None) -> dict[str, Any]:
        return {key: self.weights.read(key) for key in keys}


class HfAsFqns:
    """An HF directory seen under cairn's names and layouts, to compare it with a DCP step or a .pt
    (an MoE layer's per-expert keys as its grouped tensors)."""

    format = "hf"

    def __init__(self, hf: HfCheckpoint, model_name: str):
        self.hf, self.path, self.manifest, self.problems = hf, hf.path, hf.manifest, hf.problems
        adapter_cls = get_model_spec(model_name).state_dict_adapter
        self.adapter = adapter_cls(adapter_cls.from_hf_config(hf.config, source=str(hf.path / "config.json")))
        fqns = {fqn for key in hf.weights.shapes if (fqn := self.adapter.fqn(key)) is not None}
        if self.adapter.model_args.tie_word_embeddings and "tok_embeddings.weight" in fqns:
            fqns.add("output.weight")
        # cairn FQN -> its HF keys (several for a grouped tensor); only FQNs whose keys are all here
        self.source = {fqn: [key for key, _ in hf_sources(self.adapter, fqn)] for fqn in fqns}
        self.source = {fqn: keys for fqn, keys in self.source.items()
                       if keys and all(key in hf.weights.shapes for key in keys)}

    def entries(self) -> dict[str, Entry]:
        hf_entries = self.hf.entries()
        out = {}
        for fqn in natural_order(self.source):
            keys = self.source[fqn]
            first = hf_entries[keys[0]]
            if len(keys) == 1 and hf_sources(self.adapter, fqn)[0][1] is None:
                out[fqn] = dataclasses.replace(first, key=fqn)
            else:
                files = sorted({name for key in keys for name in hf_entries[key].files}, key=file_order)
                out[fqn] = dataclasses.replace(first, key=fqn, shape=(len(keys), *first.shape),
                                               num_bytes=first.num_bytes * len(keys), files=files)
        return out

    def read(self, keys: Iterable[str], into: dict[str, Any] | None = None) -> dict[str, Any]:
        return {fqn: self.hf.weights.read_fqn(self.adapter, fqn) for fqn in keys}


class TorchCheckpoint:
    """A ``torch.save`` file, loaded with ``weights_only=True`` (memory-mapped when possible)."""

    format = "torch"

    def __init__(self, path: Path):
        self.path, self.manifest, self.problems = path, None, []
        try:
            try:
                self.obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                self.obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckFailed(f"refusing to load: {weights_only_refusal(e)}, which a weights-only load refuses; "
                              "nothing from it was run", path) from None
        except Exception as e:
            raise CheckFailed(f"unreadable torch.save file ({type(e).__name__}: {str(e).splitlines()[0]})",
                              path) from None
        self.flat = dict(flatten(self.obj))

    def entries(self) -> dict[str, Entry]:
        out = {}
        for key, value in self.flat.items():
            if isinstance(value, torch.Tensor):
                out[key] = Entry(key, True, tuple(value.shape), value.dtype, value.numel() * value.element_size(),
                                 [self.path.name])
            else:
                out[key] = Entry(key, False, files=[self.path.name])
        return out

    def read(self, keys: Iterable[str], into: dict[str, Any] | None = None) -> dict[str, Any]:
        return {key: self.flat[key] for key in keys}


def flatten(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, leaf) pairs, as DCP flattens nested state dicts."""
    if isinstance(obj, dict) and obj:
        for key, value in obj.items():
            yield from flatten(value, f"{prefix}{key}.")
    elif isinstance(obj, list) and obj and prefix:
        for i, value in enumerate(obj):
            yield from flatten(value, f"{prefix}{i}.")
    else:
        yield prefix[:-1] if prefix else "", obj


def open_checkpoint(path: Path, *, tolerate_corrupt: bool = False):
    """The reader for ``path``'s format; UsageError/CheckFailed for what is not a readable checkpoint."""
    fmt = detect_format(path)
    try:
        if fmt == "torch":
            return TorchCheckpoint(path)
        if fmt == "hf":
            return HfCheckpoint(path)
        if not (path / METADATA_NAME).exists():
            raise CheckFailed(f"{METADATA_NAME} is missing (the manifest lists it): the step is damaged; "
                              "`cairn checkpoint verify` says more", path)
        return DcpCheckpoint(path, tolerate_corrupt=tolerate_corrupt)
    except CheckpointError as e:
        raise CheckFailed(first_line(e), path) from e


def file_order(name: str):
    """``__2_0.distcp`` before ``__10_0.distcp``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def read_batches(keys: list[str], entries: dict[str, Entry], budget: int | None = None) -> Iterator[list[str]]:
    """``keys`` in groups of at most ``budget`` (READ_BATCH_BYTES) bytes of tensors; a bigger tensor goes alone."""
    budget = READ_BATCH_BYTES if budget is None else budget
    batch: list[str] = []
    size = 0
    for key in keys:
        num_bytes = entries[key].num_bytes
        if batch and size + num_bytes > budget:
            yield batch
            batch, size = [], 0
        batch.append(key)
        size += num_bytes
    if batch:
        yield batch


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool):
    """A callable that advances a byte-counting tqdm bar on stderr (a no-op when disabled)."""
    if not enabled or total <= 0:
        yield lambda n: None
        return
    with tqdm(total=total, desc=description, unit="B", unit_scale=True, file=sys.stderr, leave=False) as bar:
        yield bar.update
