"""The manifest: what a committed step holds, with the size and xxh3-128 of every file.

Backend-neutral: the bytes of ``cairn_manifest.json`` are the same on a local disk, in an
object store and in the memory tier. The manifest is plain JSON whose last member is the
xxh3-128 of every byte before it, so a changed byte anywhere shows, and it names the step
and the save it belongs to, so a step folder moved or swapped under another name is noticed.

``check_files`` checks a local step folder against its manifest, reading nothing but the
regular files the manifest names, each at most as far as its recorded size.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import xxhash
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

import cairn
from cairn.checkpoint.errors import CheckpointError, corrupt_error
from cairn.checkpoint.fsio import NotRegularFileError, hash_file, read_regular, regular_file_stat
from cairn.checkpoint.layout import MANIFEST_NAME, step_of

MANIFEST_FORMAT = "cairn-checkpoint"
MANIFEST_VERSION = 1
CHECKSUM_ALGORITHM = "xxh3_128"
# A manifest lists sizes and hashes, not data: one larger than this is not a manifest.
MAX_MANIFEST_BYTES = 256 << 20
# The manifest's own keys; the caller's ``info`` may not reuse them.
RESERVED_KEYS = frozenset({"format", "format_version", "step", "storage", "created", "created_unix",
                           "torch_version", "cairn_version", "checksum_algorithm", "files", "total_bytes",
                           "entries", "manifest_checksum", "save_id"})
_NAME_PART = re.compile(r"^[^/\\\x00]+$")


def json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.Size):
        return list(value)
    return str(value)


def normalize_info(info: Mapping[str, Any] | None) -> dict[str, Any]:
    info = dict(info or {})
    clashes = sorted(RESERVED_KEYS & set(info))
    if clashes:
        raise ValueError(f"checkpoint info may not set the manifest's own keys {clashes}")
    # Through JSON once, so what is hashed is exactly what a reader will parse.
    return json.loads(json.dumps(info, default=json_default))


def plain_file_name(name: Any) -> bool:
    """Whether ``name`` is one plain file name (no folder, no ``..``, no backslash, no NUL)."""
    return isinstance(name, str) and name not in (".", "..") and bool(_NAME_PART.match(name))


def relative_file_name(name: Any) -> bool:
    """Whether ``name`` is a path inside a step: plain names joined by ``/``, none ``.`` or ``..``."""
    return isinstance(name, str) and bool(name) and all(plain_file_name(part) for part in name.split("/"))


def _linked_parent(step_dir: Path, name: str) -> Path | None:
    """The first folder on the way to ``step_dir / name`` that is a symbolic link, if any."""
    path = step_dir
    for part in name.split("/")[:-1]:
        path = path / part
        if path.is_symlink():
            return path
    return None


# The checksum is the file's last member, so the bytes it covers are exactly the bytes on
# disk before it: any changed byte anywhere shows, and the file stays plain JSON.
_CHECKSUM_SUFFIX = re.compile(rb',\n "manifest_checksum": "([0-9a-f]{32})"\n}\n\Z')


def manifest_bytes(body: dict[str, Any]) -> bytes:
    # One top-level member per line, each encoded by json's C encoder (``indent`` would select
    # the pure-Python one, which holds the GIL ~10x longer while training runs beside it).
    if not body:
        raise ValueError("a manifest body must be a non-empty JSON object")
    members = [f" {json.dumps(str(key))}: {json.dumps(body[key], sort_keys=True, default=json_default)}"
               for key in sorted(body)]
    text = ("{\n" + ",\n".join(members) + "\n}").encode()
    checksum = xxhash.xxh3_128(text).hexdigest()
    return text[:-2] + f',\n "manifest_checksum": "{checksum}"\n}}\n'.encode()


def parse_manifest(raw: bytes, where: str | os.PathLike) -> dict[str, Any]:
    """The manifest's dict; CorruptCheckpointError if any byte differs from what was written or
    a file it lists is not a plain name inside the step. ``where`` is the manifest's path or URI."""
    step_where = os.path.dirname(os.fspath(where)) or os.fspath(where)
    match = _CHECKSUM_SUFFIX.search(raw)
    if match is None:
        raise corrupt_error(step_where, [f"{where}: not a cairn manifest, or damaged (its checksum line is "
                                         "missing or malformed)"])
    body = raw[:match.start()] + b"\n}"
    if xxhash.xxh3_128(body).hexdigest() != match.group(1).decode():
        raise corrupt_error(step_where, [f"{where}: manifest checksum mismatch (the manifest was modified)"])
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:  # only if the writer itself was broken
        raise corrupt_error(step_where, [f"{where}: not valid JSON ({e})"]) from None
    if not isinstance(document, dict):
        raise corrupt_error(step_where, [f"{where}: not a JSON object"])
    problems = _shape_problems(document, where)
    if problems:
        raise corrupt_error(step_where, problems)
    return document


def _shape_problems(document: dict[str, Any], where: str | os.PathLike) -> list[str]:
    """A manifest whose checksum matches can still be crafted (a checksum is not a signature):
    every file it names must be a plain name with a size that is a non-negative integer."""
    files = document.get("files")
    if files is None:
        return []
    if not isinstance(files, dict):
        return [f"{where}: 'files' is not a JSON object"]
    problems = []
    for name, record in files.items():
        if not relative_file_name(name):
            problems.append(f"{where}: lists {name!r}, which is not a file inside the step (an absolute path, "
                            "'..' or empty)")
        elif not isinstance(record, dict) or type(record.get("size")) is not int or record["size"] < 0:
            problems.append(f"{where}: the record of {name!r} has no valid size")
    return problems


def check_identity(manifest: Mapping[str, Any], step: int | None, where: str | os.PathLike,
                   save_id: str | None = None) -> list[str]:
    """Problems if the manifest is not that of step ``step`` (the folder's name) or of the save
    whose DCP metadata carries ``save_id``: a step folder renamed, or files swapped between steps."""
    problems = []
    recorded = manifest.get("step")
    if step is not None and recorded is not None and recorded != step:
        problems.append(f"{where}: the manifest is that of step {recorded}, not step {step} (the step folder "
                        "was renamed or swapped with another)")
    recorded_id = manifest.get("save_id")
    if save_id is not None and recorded_id is not None and recorded_id != save_id:
        problems.append(f"{where}: the DCP metadata belongs to save {save_id}, the manifest to save "
                        f"{recorded_id} (files of two saves were mixed)")
    return problems


def folder_step(step_dir: str | os.PathLike) -> int | None:
    """The step a step folder's name says (``step-12`` -> 12), None for any other name."""
    return step_of(Path(step_dir).name)


def read_manifest(step_dir: str | os.PathLike) -> dict | None:
    """The manifest of a local step folder, None for one without (stock DCP); a damaged one (or
    one that is a link or a device) raises CorruptCheckpointError."""
    path = Path(step_dir) / MANIFEST_NAME
    try:
        raw = read_regular(path, limit=MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return None
    except CheckpointError as e:  # a link, a device, or far too large to be a manifest
        raise corrupt_error(step_dir, [str(e)]) from None
    return parse_manifest(raw, path)


def build_manifest(step: int, storage: str, files: dict[str, dict], info: dict[str, Any], checksums: bool,
                   entries: dict[str, dict] | None = None, save_id: str | None = None) -> dict[str, Any]:
    now = time.time()
    body: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "step": step,
        "storage": storage,
        "created": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"),
        "created_unix": round(now, 3),
        "torch_version": torch.__version__,
        "cairn_version": cairn.__version__,
        "checksum_algorithm": CHECKSUM_ALGORITHM if checksums else None,
        "files": files,
        "total_bytes": sum(f["size"] for f in files.values()),
    }
    if save_id is not None:
        body["save_id"] = save_id
    if entries is not None:
        body["entries"] = entries
    body.update(info)
    return body


def entries_from_metadata(metadata: Metadata) -> tuple[dict[str, dict], dict[str, set[str]]]:
    """(per-FQN shape/dtype/files, per-file FQNs) derived from DCP's metadata."""
    files_of: dict[str, set[str]] = {}
    fqns_of: dict[str, set[str]] = {}
    for index, info in (metadata.storage_data or {}).items():
        relative_path = getattr(info, "relative_path", None)
        if relative_path is not None:
            files_of.setdefault(index.fqn, set()).add(relative_path)
            fqns_of.setdefault(relative_path, set()).add(index.fqn)
    entries: dict[str, dict] = {}
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            entry = {"type": "tensor", "dtype": str(item.properties.dtype).removeprefix("torch."),
                     "shape": list(item.size), "num_chunks": len(item.chunks)}
        elif isinstance(item, BytesStorageMetadata):
            entry = {"type": "object"}
        else:
            entry = {"type": type(item).__name__}
        entry["files"] = sorted(files_of.get(fqn, ()))
        entries[fqn] = entry
    return entries, fqns_of


def holds(record: Mapping[str, Any]) -> str:
    """" (holds a, b and 3 more)": what a file record says it holds, for messages."""
    fqns = record.get("fqns") or []
    if not fqns:
        return ""
    shown = ", ".join(fqns[:6]) + (f" and {len(fqns) - 6} more" if len(fqns) > 6 else "")
    return f" (holds {shown})"


def check_files(step_dir: Path, manifest: Mapping[str, Any], *, checksums: bool,
                progress: Callable[[int, int], None] | None = None,
                only: Iterable[str] | None = None) -> list[str]:
    """Problems with ``step_dir``'s files against its manifest (sizes; hashes if ``checksums``).

    Only regular files are read, each no further than its recorded size: a name that is a
    link, a device or a FIFO is reported, never opened."""
    files: dict[str, dict] = manifest.get("files") or {}
    names = sorted(files) if only is None else sorted(set(only) & set(files))
    problems = []
    to_hash = []
    for name in names:
        record = files[name]
        path = step_dir / name
        what = holds(record)
        if not relative_file_name(name):
            problems.append(f"{path}: not a file inside the step{what}")
            continue
        if "/" in name and (link := _linked_parent(step_dir, name)) is not None:
            problems.append(f"{link} is a symbolic link; cairn never follows links in a checkpoint{what}")
            continue
        try:
            size = regular_file_stat(path).st_size
        except FileNotFoundError:
            problems.append(f"{path}: missing{what}")
            continue
        except NotRegularFileError as e:
            problems.append(f"{e}{what}")
            continue
        if size != record.get("size"):
            kind = "truncated" if size < record.get("size", 0) else "larger than written"
            problems.append(f"{path}: {kind}: {size} bytes, manifest says {record.get('size')}{what}")
        elif checksums and record.get("checksum"):
            to_hash.append((path, record))
    if to_hash:
        total = sum(record["size"] for _, record in to_hash)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        for path, record in to_hash:
            try:
                _, checksum = hash_file(path, advance, limit=record["size"])
            except (OSError, CheckpointError) as e:
                problems.append(f"{path}: unreadable ({e}){holds(record)}")
                continue
            if checksum != record["checksum"]:
                problems.append(f"{path}: checksum mismatch ({CHECKSUM_ALGORITHM} {checksum}, manifest says "
                                f"{record['checksum']}){holds(record)}")
    return problems
