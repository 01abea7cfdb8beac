"""Hugging Face checkpoints: safetensors save/load through a model's state dict adapter.

Model-agnostic: the model's adapter (``ModelSpec.state_dict_adapter(model_args)``) names
and reshapes each tensor; this module moves bytes. Both directions stream one tensor at a
time, so no process holds more than the largest tensor (plus its converted copy):

- ``save_hf``: every rank gathers each (possibly FSDP/TP/PP-sharded) tensor in one fixed
  order; rank 0 converts it and appends it to the safetensors shard planned for it (shard
  headers are written up front, from the shapes, so shards need not be held in memory).
  The directory is written under a staging name and published atomically, and loads with
  ``AutoModelForCausalLM.from_pretrained(out_dir)`` alone.
- ``load_hf``: checks names and shapes of every tensor against the headers first (nothing
  is modified if one is wrong), then reads tensor by tensor and copies only this rank's
  shard into the state dict's tensors, in place.

The adapter protocol (``adapter.StateDictAdapter``) is all this module knows of a model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from cairn.checkpoint.adapter import CONFIG_FILE, StateDictAdapter, hf_dropped, hf_parts, hf_sources
from cairn.checkpoint.errors import CheckpointError, HFCheckpointError
from cairn.checkpoint.fsio import NotRegularFileError, fsync_dir, fsync_file, read_regular, regular_file_stat
from cairn.checkpoint.layout import HF_INDEX_NAME, dtype_named

logger = logging.getLogger("cairn")

DEFAULT_MAX_SHARD_BYTES = 5_000_000_000  # transformers' own default, "5GB"
INDEX_FILE = HF_INDEX_NAME
SINGLE_FILE = "model.safetensors"
GENERATION_CONFIG_FILE = "generation_config.json"
# Copied from the tokenizer directory when present (generation_config.json is written when absent).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   GENERATION_CONFIG_FILE)
_MAX_LISTED_PROBLEMS = 12
_MAX_JSON_BYTES = 64 << 20  # config.json, the index and tokenizer configs are far smaller

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_TORCH_DTYPES = {name: dtype for dtype, name in _SAFETENSORS_DTYPES.items()}


# --- small helpers ---------------------------------------------------------------------------


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """The torch dtype an HF export of ``dtype`` (a name or a dtype) is written in; one safetensors can store."""
    try:
        resolved = dtype_named(dtype)
    except ValueError:
        resolved = None
    if resolved not in _SAFETENSORS_DTYPES:
        raise HFCheckpointError(f"export dtype {dtype!r} is not a dtype safetensors can store "
                                f"(use float32, bfloat16 or float16)")
    return resolved


def natural_order(keys) -> list[str]:
    """``layers.2`` before ``layers.10``: the order of layers in the model, and a fixed one."""
    return sorted(keys, key=lambda key: [(0, int(part), "") if part.isdigit() else (1, 0, part)
                                         for part in re.split(r"(\d+)", key)])


def _problem_list(problems: list[str]) -> str:
    shown = problems[:_MAX_LISTED_PROBLEMS]
    more = len(problems) - len(shown)
    return "\n  " + "\n  ".join(shown) + (f"\n  ... and {more} more" if more > 0 else "")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(read_regular(path, limit=_MAX_JSON_BYTES))
    except NotRegularFileError as e:
        raise HFCheckpointError(str(e)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, CheckpointError) as e:
        raise HFCheckpointError(f"{path}: cannot read {what} ({e}); is the file truncated?") from e


def read_hf_config(hf_dir: str | Path) -> dict | None:
    """The directory's config.json, or None if it has none."""
    path = Path(hf_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    config = _read_json(path, "the model config")
    if not isinstance(config, dict):
        raise HFCheckpointError(f"{path}: not a JSON object")
    return config


# --- staging and publishing ------------------------------------------------------------------


def check_output_dir(out_dir: str | Path) -> Path:
    """The output directory must not exist yet, or be empty: nothing there is ever overwritten."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise HFCheckpointError(f"output directory {out_dir} already exists and is not empty; "
                                f"choose a new path (nothing was written)")
    return out_dir


def publish_replace(staging: Path, out_dir: Path) -> None:
    """Atomically rename a finished staging directory to ``out_dir`` (absent or empty)."""
    for path in staging.rglob("*"):
        if path.is_file():
            fsync_file(path)
    fsync_dir(staging)
    os.replace(staging, out_dir)
    fsync_dir(out_dir.parent)


@contextlib.contextmanager
def staged_output(out_dir: str | Path, *, storage: Any = None, step: int | None = None,
                  info: dict | None = None) -> Iterator[Path]:
    """Yield an empty staging directory; publish it when the block succeeds, delete it if it raises.

    With a checkpoint ``storage`` (a ``store.CheckpointStore``) the staging dir is the store's
    and publishing is its commit of step ``step`` (manifest, checksums, atomic publish).
    Without, the staging dir sits beside ``out_dir`` (which must be absent or empty) and is
    renamed onto it.
    """
    if storage is not None:
        with storage.staged_dir(step, info or {}, tag="hf") as staging:
            yield staging
        return
    out_dir = check_output_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        publish_replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


# --- reading a Hugging Face directory --------------------------------------------------------


class HFWeights:
    """The tensors of a Hugging Face directory: which file holds each key, with its shape and dtype.

    Reads only headers when built; ``read(key)`` reads one tensor.
    """

    def __init__(self, hf_dir: str | Path):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise HFCheckpointError(f"{self.dir}: no such directory")
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        index_map = self._index_map()
        files = sorted(set(index_map.values())) if index_map is not None else self._unindexed_files()
        for name in files:
            path = self.dir / name
            try:
                regular_file_stat(path)
            except (OSError, NotRegularFileError) as e:
                raise HFCheckpointError(f"{path}: {e}") from None
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in handle.keys():
                        if key in self.files:
                            raise HFCheckpointError(f"{path}: tensor {key!r} is also in {self.files[key].name}")
                        tensor_slice = handle.get_slice(key)
                        self.files[key] = path
                        self.shapes[key] = tuple(tensor_slice.get_shape())
                        self.dtypes[key] = _TORCH_DTYPES.get(tensor_slice.get_dtype())
            except HFCheckpointError:
                raise
            except Exception as e:  # safetensors raises its own error types (and OSError)
                raise HFCheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        unsupported = [key for key, dtype in self.dtypes.items() if dtype is None]
        if unsupported:
            raise HFCheckpointError(f"{self.files[unsupported[0]]}: tensor {unsupported[0]!r} has a dtype "
                                    f"cairn does not convert")
        if index_map is not None:
            self._check_index(index_map)

    def _index_map(self) -> dict[str, str] | None:
        path = self.dir / INDEX_FILE
        if not path.exists():
            return None
        index = _read_json(path, "the safetensors index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise HFCheckpointError(f"{path}: invalid safetensors index (expected a non-empty "
                                    f"\"weight_map\" of tensor name -> file name)")
        for key, name in weight_map.items():
            if Path(name).name != name or not name.endswith(".safetensors"):
                raise HFCheckpointError(f"{path}: {key!r} maps to {name!r}, not a .safetensors file "
                                        f"in this directory")
            if not (self.dir / name).is_file():
                raise HFCheckpointError(f"{path}: {key!r} is in {name}, which does not exist")
        return weight_map

    def _unindexed_files(self) -> list[str]:
        if (self.dir / SINGLE_FILE).is_file():
            return [SINGLE_FILE]
        files = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if not files:
            raise HFCheckpointError(f"{self.dir}: no {SINGLE_FILE}, {INDEX_FILE} or other *.safetensors "
                                    f"file; is this a Hugging Face model directory?")
        return files

    def _check_index(self, index_map: dict[str, str]) -> None:
        index = self.dir / INDEX_FILE
        for key, name in index_map.items():
            if self.files.get(key) != self.dir / name:
                raise HFCheckpointError(f"{index}: {key!r} should be in {name}, but that file does not "
                                        f"hold it")
        for key, path in self.files.items():
            if key not in index_map:
                raise HFCheckpointError(f"{index}: {path.name} holds {key!r}, which the index does not list")

    def read(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.files[key]
        try:
            # Opened per tensor: the file's mapping is dropped as soon as the tensor is copied out.
            with safe_open(str(path), framework="pt") as handle:
                return handle.get_tensor(key)
        except Exception as e:
            raise HFCheckpointError(f"{path}: cannot read tensor {key!r} ({e}); is the file truncated?") from e

    def check(self, expected_shapes: dict[str, tuple[int, ...]], adapter: StateDictAdapter,
              hint: str = " (another model size? check the model flavor)") -> None:
        """Raise, naming every key, unless each FQN's source tensors are here with the FQN's shape
        (an expert's slice: the shape without dim 0), every key of a full export is here, and
        nothing else is."""
        fqn_of: dict[str, tuple[str, tuple[int, ...]]] = {}
        for fqn in natural_order(expected_shapes):
            for key, index in hf_sources(adapter, fqn):
                shape = tuple(expected_shapes[fqn])
                fqn_of.setdefault(key, (fqn if index is None else f"{fqn}[{index}]",
                                        shape if index is None else shape[1:]))
        expected_keys = set(adapter.hf_keys())
        problems = [f"{key!r} in {self.files[key].name} has shape {self.shapes[key]}, "
                    f"but the model's {fqn} is {shape}"
                    for key, (fqn, shape) in fqn_of.items() if key in self.files and self.shapes[key] != shape]
        problems += [f"missing {key!r}" + (f" (for {fqn_of[key][0]})" if key in fqn_of else "")
                     for key in natural_order((expected_keys | set(fqn_of)) - set(self.files))]
        problems += [f"unexpected {key!r} in {self.files[key].name}"
                     for key in natural_order(set(self.files) - expected_keys)
                     if not adapter.is_ignored_hf_key(key)]
        if problems:
            raise HFCheckpointError(f"{self.dir} does not match the model{hint}:" + _problem_list(problems))

    def read_fqn(self, adapter: StateDictAdapter, fqn: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """``fqn``'s tensor in cairn's layout, read from its key, or stacked from its slices' keys
        (only slices ``rows[0]`` to ``rows[1]`` when given)."""
        sources = hf_sources(adapter, fqn)
        if len(sources) == 1 and sources[0][1] is None:
            return adapter.tensor_from_hf(fqn, self.read(sources[0][0]))
        start, stop = rows if rows is not None else (0, len(sources))
        return adapter.tensor_from_hf(fqn, torch.stack([self.read(key) for key, _ in sources[start:stop]]))

    def dtype_of(self, adapter: StateDictAdapter, fqn: str) -> torch.dtype:
        return self.dtypes[hf_sources(adapter, fqn)[0][0]]


def check_hf_dir_config(hf_dir: Path, adapter: StateDictAdapter) -> None:
    """If the directory has a config.json, it must describe the adapter's architecture and size."""
    config = read_hf_config(hf_dir)
    if config is not None:
        adapter.check_hf_config(config, source=str(hf_dir / CONFIG_FILE))


# --- load_hf --------------------------------------------------------------------------------


@torch.no_grad()
def load_hf(model_state_dict: dict[str, torch.Tensor], hf_dir: str | Path,
            adapter: StateDictAdapter) -> dict[str, Any]:
    """Fill ``model_state_dict``'s tensors in place from the safetensors files in ``hf_dir``.

    The state dict may be any layout: plain tensors, DTensors (FSDP/TP/EP shards: each rank
    copies only its own shard) or one pipeline stage's subset of the keys. A tensor stored one
    slice per key (grouped experts) is read only for the slices this rank holds. Every name and
    shape is checked before a tensor changes; tensors Hugging Face has no place for are set to
    zeros (their value in a model that never trained with them) and listed under "dropped". No
    collectives: ranks may call it independently.
    Returns {"tensors", "keys", "bytes", "seconds", "dropped"} read by this rank.
    """
    start = time.perf_counter()
    hf_dir = Path(hf_dir)
    weights = HFWeights(hf_dir)
    check_hf_dir_config(hf_dir, adapter)
    weights.check({fqn: tuple(t.shape) for fqn, t in model_state_dict.items()}, adapter)
    dropped = [fqn for fqn in natural_order(model_state_dict) if hf_dropped(adapter, fqn)]
    # Grouped by file (model order within one): each shard is read front to back once.
    order = sorted((fqn for fqn in natural_order(model_state_dict) if fqn not in dropped),
                   key=lambda fqn: str(weights.files[hf_sources(adapter, fqn)[0][0]]))
    for fqn in dropped:
        _local(model_state_dict[fqn]).zero_()
    num_bytes = num_keys = 0
    for fqn in order:
        target = model_state_dict[fqn]
        split = hf_sources(adapter, fqn)[0][1] is not None
        offsets, sizes = local_box(target)
        if split and sizes[0] == 0:
            continue  # this rank holds none of its slices
        rows = (offsets[0], offsets[0] + sizes[0]) if split else None
        data = weights.read_fqn(adapter, fqn, rows)
        num_keys += rows[1] - rows[0] if split else 1
        num_bytes += data.numel() * data.element_size()
        if split:  # the rows read are this rank's; its block of the other dims is cut from them
            block = (slice(None),) + tuple(slice(o, o + n) for o, n in zip(offsets[1:], sizes[1:]))
            _local(target).copy_(data[block])
        else:
            _copy_full_into(target, data)
        del data
    return {"tensors": len(order), "keys": num_keys, "bytes": num_bytes, "seconds": time.perf_counter() - start,
            "dropped": dropped}


def local_box(tensor: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(offsets, sizes) of this rank's block of ``tensor`` in the global tensor (a DTensor's shard)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(tensor, DTensor):
        return (0,) * tensor.dim(), tuple(tensor.shape)
    chunks = tensor.__create_chunk_list__()  # the block DCP writes for this rank
    if not chunks:
        return (0,) * tensor.dim(), (0,) * tensor.dim()
    return tuple(chunks[0].offsets), tuple(chunks[0].sizes)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _copy_full_into(target: torch.Tensor, full: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        # src_data_rank=None: every rank holds the full tensor and keeps its shard, no communication.
        local = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None).to_local()
        target.to_local().copy_(local)
    else:
        target.copy_(full)


# --- writing a Hugging Face directory --------------------------------------------------------


class HFExportWriter:
    """Streams converted tensors into planned safetensors shards, then writes the index and config.

    ``entries`` lists every (fqn, shape) to export, in the order ``write`` will receive them;
    shards are cut from that order at ``max_shard_bytes``. Each shard's header is written
    when its first tensor arrives, so a shard is never held in memory. A tensor the adapter
    splits (grouped experts) is written as one key per slice of dim 0, consecutively.
    """

    def __init__(self, directory: Path, adapter: StateDictAdapter, dtype: torch.dtype | str,
                 entries: list[tuple[str, tuple[int, ...]]], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        if sys.byteorder != "little":
            raise HFCheckpointError("safetensors files are little-endian; this host is not")
        self.directory = Path(directory)
        self.adapter = adapter
        self.dtype = resolve_dtype(dtype)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        plan = [(fqn, key, index, tuple(shape) if index is None else tuple(shape)[1:])
                for fqn, shape in entries for key, index in hf_parts(adapter, fqn)]
        plan = [(fqn, key, index, shape, itemsize * math.prod(shape)) for fqn, key, index, shape in plan]
        self.shards = _cut_shards(plan, max_shard_bytes)
        names = [SINGLE_FILE] if len(self.shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors" for i in range(len(self.shards))]
        self._where: dict[str, list[tuple[int, int]]] = {}
        for shard_id, shard in enumerate(self.shards):
            for position, (fqn, *_) in enumerate(shard):
                self._where.setdefault(fqn, []).append((shard_id, position))
        self.file_names = names
        self.total_bytes = sum(entry[4] for shard in self.shards for entry in shard)
        self._file = None
        self._next = (0, 0)

    def write(self, fqn: str, tensor: torch.Tensor) -> None:
        """Convert ``fqn``'s full tensor and append it (or its slices); fqns come in ``entries`` order."""
        if fqn not in self._where:  # not exported (a tied output, a dropped tensor)
            return
        data = self.adapter.tensor_to_hf(fqn, tensor.detach().to("cpu")).to(self.dtype)
        for shard_id, position in self._where[fqn]:
            if (shard_id, position) != self._next:
                raise RuntimeError(f"HFExportWriter: {fqn} written out of the planned order")
            _, key, index, shape, nbytes = self.shards[shard_id][position]
            piece = (data if index is None else data[index]).contiguous()
            if tuple(piece.shape) != shape:
                raise HFCheckpointError(f"{fqn}: tensor of shape {tuple(piece.shape)} where {shape} was planned "
                                        f"for {key}")
            if position == 0:
                self._open_shard(shard_id)
            self._file.write(piece.reshape(-1).view(torch.uint8).numpy())
            if position + 1 == len(self.shards[shard_id]):
                self._file.close()
                self._file = None
                self._next = (shard_id + 1, 0)
            else:
                self._next = (shard_id, position + 1)

    def _open_shard(self, shard_id: int) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for _, key, _, shape, nbytes in self.shards[shard_id]:
            header[key] = {"dtype": _SAFETENSORS_DTYPES[self.dtype], "shape": list(shape),
                           "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
        self._file = open(self.directory / self.file_names[shard_id], "wb")
        self._file.write(len(encoded).to_bytes(8, "little"))
        self._file.write(encoded)

    def finish(self, tokenizer_dir: str | Path | None = None) -> None:
        """Write the index (when sharded), config.json, generation_config.json and tokenizer files."""
        if self._next != (len(self.shards), 0):
            missing = self.shards[self._next[0]][self._next[1]][0]
            raise RuntimeError(f"HFExportWriter: finished before {missing} was written")
        if len(self.shards) > 1:
            weight_map = {key: self.file_names[i] for i, shard in enumerate(self.shards)
                          for _, key, *_ in shard}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        write_hf_metadata(self.directory, self.adapter, self.dtype, tokenizer_dir)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _cut_shards(plan: list[tuple], max_shard_bytes: int) -> list[list[tuple]]:
    """Consecutive runs of at most ``max_shard_bytes`` (a larger tensor gets a shard of its own)."""
    if max_shard_bytes <= 0:
        raise HFCheckpointError(f"max_shard_bytes must be positive (got {max_shard_bytes})")
    shards: list[list[tuple]] = [[]]
    size = 0
    for entry in plan:
        if shards[-1] and size + entry[4] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry[4]
    if not shards[-1]:
        raise HFCheckpointError("nothing to export: the state dict has no tensor the adapter saves")
    return shards


def special_token_ids(tokenizer_dir: str | Path | None) -> dict[str, Any]:
    """bos/eos ids from the tokenizer directory: its config.json or generation_config.json, else
    tokenizer_config.json's bos/eos tokens looked up in tokenizer.json."""
    if tokenizer_dir is None:
        return {}
    tokenizer_dir = Path(tokenizer_dir)
    for name in (CONFIG_FILE, GENERATION_CONFIG_FILE):
        if (tokenizer_dir / name).is_file():
            config = _read_json(tokenizer_dir / name, "the config")
            ids = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None}
            if ids:
                return ids
    if not ((tokenizer_dir / "tokenizer_config.json").is_file() and (tokenizer_dir / "tokenizer.json").is_file()):
        return {}
    tokenizer_config = _read_json(tokenizer_dir / "tokenizer_config.json", "the tokenizer config")
    added = _read_json(tokenizer_dir / "tokenizer.json", "the tokenizer").get("added_tokens") or []
    by_content = {token.get("content"): token.get("id") for token in added}
    ids = {}
    for role in ("bos", "eos"):
        token = tokenizer_config.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if by_content.get(token) is not None:
            ids[f"{role}_token_id"] = by_content[token]
    return ids


def write_hf_metadata(directory: Path, adapter: StateDictAdapter, dtype: torch.dtype | str,
                      tokenizer_dir: str | Path | None = None) -> None:
    """config.json from the adapter, tokenizer files copied, generation_config.json."""
    ids = special_token_ids(tokenizer_dir)
    config = adapter.to_hf_config(resolve_dtype(dtype), **ids)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            source = Path(tokenizer_dir) / name
            if source.is_file():
                shutil.copyfile(source, directory / name)
    if not (directory / GENERATION_CONFIG_FILE).exists():
        (directory / GENERATION_CONFIG_FILE).write_text(json.dumps(ids, indent=2) + "\n")


# --- save_hf --------------------------------------------------------------------------------


def save_hf(model_state_dict: dict[str, torch.Tensor], out_dir: str | Path, adapter: StateDictAdapter, *,
            dtype: torch.dtype | str, tokenizer_dir: str | Path | None = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, storage: Any = None, step: int | None = None,
            info: dict | None = None) -> dict[str, Any]:
    """Write the model as a Hugging Face directory that ``from_pretrained(out_dir)`` loads alone.

    Collective when a process group is initialized: every rank calls it with its own state
    dict (plain tensors, FSDP/TP DTensors, or a pipeline stage's subset of the keys).
    Tensors are gathered one at a time in one fixed order and rank 0 alone writes; an error
    on rank 0 is raised on every rank once the gathers are done, so no rank hangs. The
    directory appears atomically: through ``storage.publish_dir(staging, step, info)`` when
    a checkpoint storage is given, else by a rename onto ``out_dir`` (absent or empty).
    Tensors Hugging Face has no place for (``hf_dropped``) are left out and named, in the log and
    under "dropped". Returns {"bytes", "files", "seconds", "dropped"} (bytes and files on rank 0 only).
    """
    start = time.perf_counter()
    dtype = resolve_dtype(dtype)
    entries = _global_entries(model_state_dict, adapter)
    dropped = dropped_tensors(model_state_dict, adapter)
    if dropped and storage is not None:  # the step's manifest names what the export left out
        info = {**(info or {}), "hf_dropped": sorted(dropped)}
    if storage is None:
        _raise_on_every_rank(_first_error(lambda: check_output_dir(out_dir)) if _rank() == 0 else None)
    tensors = _gathered(model_state_dict, entries)
    result: dict[str, Any] = {"bytes": 0, "files": []}
    error = None
    if _rank() == 0:
        plan = [(fqn, shape) for fqn, shape, _, _ in entries]
        error = _first_error(lambda: result.update(_write_export(
            tensors, adapter, dtype, plan, max_shard_bytes, tokenizer_dir,
            staged_output(out_dir, storage=storage, step=step, info=info))))
    for _ in tensors:
        pass  # other ranks feed the gathers; rank 0 drains them after an error
    _raise_on_every_rank(error)
    return {**result, "seconds": time.perf_counter() - start, "dropped": dropped}


def dropped_tensors(state_dict: dict[str, torch.Tensor], adapter: StateDictAdapter) -> dict[str, str]:
    """{fqn: why} of the tensors a Hugging Face export leaves out (this rank's keys), logged once."""
    dropped = {fqn: why for fqn in natural_order(state_dict) if (why := hf_dropped(adapter, fqn))}
    if dropped and _rank() == 0:
        reasons = sorted(set(dropped.values()))
        logger.warning("the Hugging Face export leaves out %d tensor(s) it has no place for: %s (%s)", len(dropped),
                       ", ".join(dropped), "; ".join(reasons))
    return dropped


def _write_export(tensors, adapter, dtype, plan, max_shard_bytes, tokenizer_dir, staged) -> dict:
    with staged as staging:
        with contextlib.closing(HFExportWriter(staging, adapter, dtype, plan, max_shard_bytes)) as writer:
            for fqn, tensor in tensors:
                writer.write(fqn, tensor)
                del tensor
            writer.finish(tokenizer_dir)
    return {"bytes": writer.total_bytes, "files": list(writer.file_names)}


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _first_error(fn: Callable[[], Any]) -> BaseException | None:
    try:
        fn()
    except Exception as e:
        return e
    return None


def _raise_on_every_rank(error: BaseException | None) -> None:
    """Raise rank 0's error (given on rank 0) on every rank; a no-op when it had none."""
    if _world_size() > 1:
        import torch.distributed as dist

        box = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=0)
        if _rank() != 0 and box[0] is not None:
            raise HFCheckpointError(f"saving on rank 0 failed: {box[0]}")
    if error is not None:
        raise error


def _global_entries(state_dict: dict[str, torch.Tensor], adapter: StateDictAdapter) -> list[tuple]:
    """(fqn, global shape, dtype, lowest rank holding it) of every exported tensor, in model order.

    Pipeline stages hold different keys, so the ranks first agree on the union.
    """
    local = {fqn: (tuple(t.shape), t.dtype) for fqn, t in state_dict.items() if hf_parts(adapter, fqn)}
    per_rank: list[Any] = [local]
    if _world_size() > 1:
        import torch.distributed as dist

        per_rank = [None] * _world_size()
        dist.all_gather_object(per_rank, local)
    merged: dict[str, tuple] = {}
    for rank, held in enumerate(per_rank):
        for fqn, (shape, dtype) in held.items():
            merged.setdefault(fqn, (shape, dtype, rank))
    return [(fqn, *merged[fqn]) for fqn in natural_order(merged)]


def _gathered(state_dict: dict[str, torch.Tensor], entries: list[tuple]) -> Iterator[tuple[str, torch.Tensor]]:
    """Full tensors in ``entries`` order, yielded on rank 0; every rank must exhaust it.

    A DTensor is gathered by the ranks of its mesh (``full_tensor``); a key rank 0 does not
    hold (a later pipeline stage) is then sent to it by the lowest rank holding it.
    """
    from torch.distributed.tensor import DTensor

    rank = _rank()
    for fqn, shape, dtype, owner in entries:
        full = None
        if fqn in state_dict:
            tensor = state_dict[fqn].detach()
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if owner != 0 and rank in (0, owner):
            full = _send_to_rank0(full, shape, dtype, owner)
        if rank == 0:
            yield fqn, full
        del full


def _send_to_rank0(full: torch.Tensor | None, shape, dtype, owner: int) -> torch.Tensor | None:
    import torch.distributed as dist

    # gloo (alone or as the cpu half of "cuda:nccl,cpu:gloo") moves host tensors; NCCL alone needs the GPU.
    device = torch.device("cpu") if "gloo" in str(dist.get_backend()) else torch.device(
        "cuda", torch.cuda.current_device())
    if _rank() == owner:
        dist.send(full.to(device).contiguous(), dst=0)
        return None
    received = torch.empty(shape, dtype=dtype, device=device)
    dist.recv(received, src=owner)
    return received
