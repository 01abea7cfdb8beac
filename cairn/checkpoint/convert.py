"""Offline conversion of cairn's DCP checkpoints to and from Hugging Face directories, and to a
single ``.pt`` file, on one CPU process.

Shared by ``scripts/checkpoint_conversion/convert_{from,to}_hf.py`` and ``cairn checkpoint
convert``. The HF directions stream one tensor at a time, so memory stays near the largest
tensor whatever the model size:

- HF -> DCP: ``dcp.save`` is handed a state dict of meta tensors (shapes only) and a planner
  whose ``resolve_data`` reads, converts and returns each tensor only when the writer asks
  for it. The result is an ordinary model-only DCP checkpoint (``.metadata`` and one
  ``__0_<i>.distcp`` file per tensor) that ``--checkpoint.initial_load_path`` reshards onto
  any layout.
- DCP -> HF: each model key is read on its own from the DCP checkpoint (whatever layout
  saved it, optimizer state left unread) and appended to the safetensors shard planned for it.

DCP -> ``.pt`` (``dcp_to_torch_file``) writes what ``dcp_to_torch_save`` writes, a batch of
tensors at a time. Every conversion writes into a staging directory whose result is renamed
onto the output only when complete.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import math
import mmap
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from cairn.checkpoint.adapter import CONFIG_FILE, hf_dropped, hf_parts
from cairn.checkpoint.api import single_process_dcp
from cairn.checkpoint.errors import HFCheckpointError, reraise_user_error
from cairn.checkpoint.fsio import fsync_dir
from cairn.checkpoint.hf import (
    DEFAULT_MAX_SHARD_BYTES,
    HFExportWriter,
    HFWeights,
    natural_order,
    read_hf_config,
    resolve_dtype,
    staged_output,
)
from cairn.checkpoint.layout import EXPORT_DTYPES, METADATA_NAME, cast_dtype
from cairn.checkpoint.reader import CachedMetadataReader, SafeFileSystemReader, set_element
from cairn.checkpoint.readers import (
    DcpCheckpoint,
    TorchCheckpoint,
    UsageError,
    detect_format,
    group_of,
    progress_bar,
    read_batches,
    read_manifest_quietly,
)
from cairn.checkpoint.torchzip import fix_zip_crcs
from cairn.models import ModelSpec, get_model_spec

_METADATA_FILE = METADATA_NAME


def convert_hf_to_dcp(hf_dir: str | Path, out_dir: str | Path, *, model_name: str = "llama3",
                      flavor: str | None = None, dtype: torch.dtype | str | None = None,
                      progress: bool = True) -> dict[str, Any]:
    """Hugging Face safetensors directory -> model-only DCP checkpoint at ``out_dir``.

    The model size comes from ``flavor``, else from the directory's config.json (which,
    when both exist, must agree). Tensors keep their dtype unless ``dtype`` is given; tensors
    Hugging Face has no place for (``hf_dropped``) are written as zeros and listed under "dropped".
    Returns {"tensors", "bytes", "seconds", "flavor", "dropped"}.
    """
    start = time.perf_counter()
    hf_dir = Path(hf_dir)
    spec = get_model_spec(model_name)
    weights = HFWeights(hf_dir)
    config = read_hf_config(hf_dir)
    args = _model_args(spec, flavor, config, str(hf_dir / CONFIG_FILE), lambda adapter: _fqn_shapes(
        adapter, weights.shapes))
    adapter = spec.state_dict_adapter(args)
    if config is not None:
        adapter.check_hf_config(config, source=str(hf_dir / CONFIG_FILE))
    shapes = _model_shapes(spec, args)
    weights.check(shapes, adapter, hint=_flavor_hint(flavor))
    cast = None if dtype is None else resolve_dtype(dtype)
    # Tensors HF has no place for (an MoE balancing bias) start at zero, as an import does.
    dropped = {fqn: why for fqn in shapes if (why := hf_dropped(adapter, fqn))}
    targets = {fqn: torch.empty(shape, dtype=cast or (torch.float32 if fqn in dropped else
                                                      weights.dtype_of(adapter, fqn)), device="meta")
               for fqn, shape in shapes.items()}
    total = sum(t.numel() * t.element_size() for t in targets.values())

    def produce(fqn: str) -> torch.Tensor:
        return torch.zeros(shapes[fqn]) if fqn in dropped else weights.read_fqn(adapter, fqn)

    with staged_output(out_dir) as staging, _progress(total, "HF -> DCP", progress) as bar:
        planner = _ConvertingSavePlanner(produce, on_tensor=bar)
        # One file per tensor: DCP's writer keeps every tensor of a file referenced until the file
        # is complete (torch 2.13), so a single file would hold the whole model in memory here.
        writer = FileSystemWriter(staging, single_file_per_rank=False, thread_count=1)
        with _single_process_dcp():
            dcp.save(targets, storage_writer=writer, planner=planner, no_dist=True)
    if flavor is None and config is not None:
        flavor = spec.state_dict_adapter.match_flavor(config)
    return {"tensors": len(targets), "bytes": total, "seconds": time.perf_counter() - start, "flavor": flavor,
            "dropped": sorted(dropped)}


def convert_dcp_to_hf(dcp_dir: str | Path, out_dir: str | Path, *, model_name: str = "llama3",
                      flavor: str | None = None, hf_assets_path: str | Path | None = None,
                      export_dtype: torch.dtype | str = "float32",
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True) -> dict[str, Any]:
    """cairn DCP checkpoint (full or model-only, any saving layout) -> Hugging Face directory.

    The model size comes from ``flavor``, else from ``hf_assets_path/config.json``; the
    vocabulary size from the checkpoint. Tokenizer files (and bos/eos ids) are taken from
    ``hf_assets_path``. Returns {"tensors", "bytes", "seconds", "files"}.
    """
    start = time.perf_counter()
    dcp_dir = Path(dcp_dir)
    spec = get_model_spec(model_name)
    reader = _dcp_reader(dcp_dir)
    saved = {key: md for key, md in reader.read_metadata().state_dict_metadata.items()
             if isinstance(md, TensorStorageMetadata)}
    config = read_hf_config(hf_assets_path) if hf_assets_path else None
    config_source = str(Path(hf_assets_path) / CONFIG_FILE) if hf_assets_path else "--hf_assets_path config.json"
    saved_shapes = {key: tuple(md.size) for key, md in saved.items()}
    args = _model_args(spec, flavor, config, config_source, lambda adapter: saved_shapes)
    adapter = spec.state_dict_adapter(args)
    if config is not None:
        adapter.check_hf_config(config, source=config_source)
    shapes = _model_shapes(spec, args)
    _check_dcp_shapes(dcp_dir, saved_shapes, shapes, flavor)
    export_dtype = resolve_dtype(export_dtype)
    entries = [(fqn, shapes[fqn]) for fqn in natural_order(shapes) if hf_parts(adapter, fqn)]
    dropped = sorted(fqn for fqn in shapes if hf_dropped(adapter, fqn))
    total = sum(math.prod(shape) * saved[fqn].properties.dtype.itemsize for fqn, shape in entries)
    with staged_output(out_dir) as staging, _progress(total, "DCP -> HF", progress) as bar:
        with contextlib.closing(HFExportWriter(staging, adapter, export_dtype, entries, max_shard_bytes)) as writer:
            for fqn, shape in entries:
                tensor = _read_dcp_tensor(reader, fqn, shape, saved[fqn].properties.dtype)
                bar(tensor)
                writer.write(fqn, tensor)
                del tensor
            writer.finish(hf_assets_path)
    return {"tensors": len(entries), "bytes": writer.total_bytes, "seconds": time.perf_counter() - start,
            "files": list(writer.file_names), "dropped": dropped}


def dcp_to_torch_file(src: Path, dst: Path, *, export_dtype: torch.dtype | None = None,
                      progress: bool = False) -> dict[str, Any]:
    """A DCP checkpoint as one ``torch.save`` file: what ``dcp_to_torch_save`` writes, streamed.

    The nested state dict DCP's own converter builds (same keys, same nesting, same values)
    is written by ``torch.save`` with its tensor bytes left empty (``skip_data``); the file
    is then memory-mapped shared and every tensor is read from the checkpoint straight into
    its place, a batch at a time. Memory stays near one batch whatever the model size;
    non-tensor values load with ``weights_only=True``. Floating tensors are cast to
    ``export_dtype`` if given.
    """
    start = time.perf_counter()
    ckpt = DcpCheckpoint(src)
    entries = ckpt.entries()
    paths = ckpt.metadata.planner_data or {}
    tensor_keys = [key for key, e in entries.items() if e.is_tensor]
    value_keys = [key for key, e in entries.items() if not e.is_tensor]
    values = ckpt.read(value_keys) if value_keys else {}
    skeleton: dict[str, Any] = {}
    with FakeTensorMode():
        for key, entry in entries.items():
            value = (torch.empty(entry.shape, dtype=cast_dtype(entry.dtype, export_dtype)) if entry.is_tensor
                     else values[key])
            set_element(skeleton, paths.get(key, (key,)), value)
    staging = dst.parent / f".{dst.name}.staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        partial = staging / dst.name  # the same file name: torch.save names the archive's folder after it
        with torch.serialization.skip_data(materialize_fake_tensors=True):
            torch.save(skeleton, partial)
        del skeleton
        with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
            mapped = torch.load(partial, mmap=True, weights_only=True)
        targets = {key: _get_path(mapped, paths.get(key, (key,))) for key in tensor_keys}
        total = sum(entries[key].num_bytes for key in tensor_keys)
        with progress_bar(total, "DCP -> torch", progress) as advance:
            for batch in read_batches(tensor_keys, entries):
                ckpt.read(batch, into=targets)
                advance(sum(entries[key].num_bytes for key in batch))
        for key in value_keys:  # values holding tensors (RNG states) were saved without their bytes too
            _copy_tensors_into(_get_path(mapped, paths.get(key, (key,))), values[key])
        del targets, mapped
        gc.collect()  # unmap before the CRCs are read back
        fix_zip_crcs(partial)
        os.replace(partial, dst)
        fsync_dir(dst.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"tensors": len(tensor_keys), "values": len(value_keys),
            "bytes": sum(math.prod(entries[k].shape) * cast_dtype(entries[k].dtype, export_dtype).itemsize
                         for k in tensor_keys), "seconds": time.perf_counter() - start}


# --- model resolution ------------------------------------------------------------------------


def _model_args(spec: ModelSpec, flavor: str | None, config: dict | None, config_source: str,
                checkpoint_shapes: Callable[[Any], dict[str, tuple[int, ...]]]):
    """Model args from the flavor (else config.json), with the checkpoint's vocabulary size."""
    adapter_cls = spec.state_dict_adapter
    if flavor is not None:
        if flavor not in spec.flavors:
            raise HFCheckpointError(f"--model_flavor {flavor!r}: not a flavor of {spec.name}; choose from "
                                    f"{', '.join(spec.flavors)}")
        args = copy.deepcopy(spec.flavors[flavor])
    elif config is not None:
        args = adapter_cls.from_hf_config(config, source=config_source)
    else:
        raise HFCheckpointError(f"--model_flavor is required: there is no {config_source} to read the model "
                                f"size from")
    return adapter_cls.fit_to_checkpoint(args, checkpoint_shapes(adapter_cls(args)))


def _fqn_shapes(adapter, hf_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    out = {}
    for key, shape in hf_shapes.items():
        with contextlib.suppress(HFCheckpointError):  # unknown keys are reported by HFWeights.check
            fqn = adapter.fqn(key)
            if fqn is not None:
                out[fqn] = shape
    return out


def _model_shapes(spec: ModelSpec, args) -> dict[str, tuple[int, ...]]:
    """Every FQN of the model's state dict (tied weights under both names) with its shape."""
    with torch.device("meta"):
        model = spec.model_cls(args)
    return {fqn: tuple(t.shape) for fqn, t in model.state_dict().items()}


def _flavor_hint(flavor: str | None) -> str:
    return f" (is --model_flavor {flavor} right?)" if flavor else " (is config.json right?)"


def _check_dcp_shapes(dcp_dir: Path, saved: dict, shapes: dict, flavor: str | None) -> None:
    problems = [f"{fqn!r}: checkpoint shape {saved[fqn]} != model shape {shapes[fqn]}"
                for fqn in natural_order(shapes) if fqn in saved and saved[fqn] != shapes[fqn]]
    problems += [f"model key {fqn!r} is missing" for fqn in natural_order(shapes) if fqn not in saved]
    if problems:
        listed = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise HFCheckpointError(f"{dcp_dir / _METADATA_FILE} does not match the model"
                                f"{_flavor_hint(flavor)}:\n  {listed}")


# --- DCP plumbing ----------------------------------------------------------------------------


class _ConvertingSavePlanner(DefaultSavePlanner):
    """Plans from meta tensors; produces each tensor only when the storage writer asks for it."""

    def __init__(self, produce: Callable[[str], torch.Tensor], on_tensor: Callable[[torch.Tensor], None]):
        super().__init__()
        self._produce = produce
        self._on_tensor = on_tensor

    def resolve_data(self, write_item):
        tensor = self._produce(write_item.index.fqn).to(write_item.tensor_data.properties.dtype)
        self._on_tensor(tensor)
        return tensor


def _dcp_reader(dcp_dir: Path) -> SafeFileSystemReader:
    if not (dcp_dir / _METADATA_FILE).is_file():
        found = " (it holds safetensors: convert it with convert_from_hf)" if any(dcp_dir.glob("*.safetensors")) \
            else ""
        raise HFCheckpointError(f"{dcp_dir}: not a DCP checkpoint, no {_METADATA_FILE} file{found}")
    reader = CachedMetadataReader(dcp_dir)
    try:
        reader.read_metadata()
    except Exception as e:
        raise HFCheckpointError(f"{dcp_dir / _METADATA_FILE}: unreadable DCP metadata ({e})") from e
    return reader


def _read_dcp_tensor(reader: SafeFileSystemReader, fqn: str, shape, dtype: torch.dtype) -> torch.Tensor:
    state = {fqn: torch.empty(shape, dtype=dtype)}
    with _single_process_dcp():
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state[fqn]


@contextlib.contextmanager
def _single_process_dcp():
    """DCP in one process: no warning about it, and the error itself rather than DCP's wrapper."""
    with single_process_dcp():
        try:
            yield
        except CheckpointException as e:  # a BaseException holding {rank: (error, traceback)}
            reraise_user_error(e)


@contextlib.contextmanager
def _progress(total_bytes: int, description: str, enabled: bool):
    """A callable that advances a tqdm bar by a tensor's bytes."""
    from tqdm import tqdm

    with tqdm(total=total_bytes, desc=description, unit="B", unit_scale=True, disable=not enabled) as bar:
        yield lambda tensor: bar.update(tensor.numel() * tensor.element_size())


# --- the .pt file --------------------------------------------------------------------------------


def _get_path(root: Any, path: Iterable[Any]) -> Any:
    for part in path:
        root = root[part]
    return root


def _copy_tensors_into(target: Any, source: Any) -> None:
    """Copy the tensors inside a (nested) value into the same places of ``target``."""
    if isinstance(target, torch.Tensor):
        target.copy_(source)
    elif isinstance(target, dict):
        for key in target:
            _copy_tensors_into(target[key], source[key])
    elif isinstance(target, (list, tuple)):
        for t, s in zip(target, source):
            _copy_tensors_into(t, s)



# --- any format to any other (``cairn checkpoint convert``) ------------------------------------------


def torch_file_to_dcp(src: Path, dst: Path, *, export_dtype: torch.dtype | None = None,
                      progress: bool = False) -> dict:
    """A ``torch.save`` state dict (memory-mapped) as a DCP checkpoint, one tensor read at a time."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.planner import WriteItemType

    start = time.perf_counter()
    ckpt = TorchCheckpoint(src)
    if not isinstance(ckpt.obj, dict) or not ckpt.obj:
        raise UsageError(f"holds a {type(ckpt.obj).__name__}, not a state dict", src)
    flat, _ = flatten_state_dict(ckpt.obj)
    total = sum(t.numel() * t.element_size() for t in flat.values() if isinstance(t, torch.Tensor))

    def shapes_only(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.empty(value.shape, dtype=cast_dtype(value.dtype, export_dtype), device="meta")
        if isinstance(value, dict):
            return {k: shapes_only(v) for k, v in value.items()}
        if isinstance(value, list):
            return [shapes_only(v) for v in value]
        return value

    class StreamingPlanner(DefaultSavePlanner):
        """Plans from meta tensors; reads each tensor from the mapped file only when it is written."""

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            tensor = flat[write_item.index.fqn].to(write_item.tensor_data.properties.dtype)
            advance(tensor.numel() * tensor.element_size())
            return tensor

    with staged_output(dst) as staging, progress_bar(total, "torch -> DCP", progress) as advance:
        with single_process_dcp():
            dcp.save(shapes_only(ckpt.obj), storage_writer=FileSystemWriter(staging, thread_count=1),
                     planner=StreamingPlanner(), no_dist=True)
    num_tensors = sum(1 for t in flat.values() if isinstance(t, torch.Tensor))
    return {"tensors": num_tensors, "values": len(flat) - num_tensors, "bytes": total,
            "seconds": time.perf_counter() - start}


def recast_dcp(src: Path, dst: Path, *, export_dtype: torch.dtype | None, model_only: bool = False,
               progress: bool = False) -> dict:
    """A DCP checkpoint re-cast to ``export_dtype``: a smaller copy of a full step, streamed a batch
    of tensors at a time. Cast are the model's floating tensors and the optimizer's moments (not
    its step counts, nor RNG or data state, which a cast would destroy); ``model_only`` keeps the
    model keys only."""
    start = time.perf_counter()
    ckpt = DcpCheckpoint(src)
    entries = ckpt.entries()
    keys = [key for key, entry in entries.items() if not model_only or group_of(key) == "model"]
    tensor_keys = [key for key in keys if entries[key].is_tensor]
    value_keys = [key for key in keys if not entries[key].is_tensor]
    values = ckpt.read(value_keys) if value_keys else {}
    total = sum(entries[key].num_bytes for key in tensor_keys)
    def recast(key: str) -> torch.dtype:
        cast = group_of(key) == "model" or (group_of(key) == "optimizer" and not key.endswith(".step"))
        return cast_dtype(entries[key].dtype, export_dtype if cast else None)

    targets = {key: torch.empty(entries[key].shape, dtype=recast(key), device="meta") for key in tensor_keys}
    batches = {key: batch for batch in read_batches(tensor_keys, entries) for key in batch}
    loaded: dict[str, torch.Tensor] = {}

    class RecastingPlanner(DefaultSavePlanner):
        """Plans from meta tensors; reads each batch of tensors when the writer first asks for one of them."""

        def resolve_data(self, write_item):
            from torch.distributed.checkpoint.planner import WriteItemType

            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            key = write_item.index.fqn
            if key not in loaded:
                loaded.clear()
                batch = batches[key]
                loaded.update(ckpt.read(batch))
                advance(sum(entries[k].num_bytes for k in batch))
            return loaded[key].to(write_item.tensor_data.properties.dtype)

    with staged_output(dst) as staging, progress_bar(total, "DCP -> DCP", progress) as advance:
        with single_process_dcp():
            dcp.save({**targets, **values}, storage_writer=FileSystemWriter(staging, thread_count=1,
                                                                           single_file_per_rank=False),
                     planner=RecastingPlanner(), no_dist=True)
    return {"tensors": len(tensor_keys), "values": len(value_keys),
            "bytes": sum(math.prod(entries[k].shape) * recast(k).itemsize for k in tensor_keys),
            "seconds": time.perf_counter() - start}


@dataclasses.dataclass
class ConvertOptions:
    model_name: str
    flavor: str | None
    export_dtype: str | None
    hf_assets_path: str | None
    max_shard_bytes: int
    progress: bool
    model_only: bool = False


def _defaults_from_manifest(src: Path, options: ConvertOptions) -> ConvertOptions:
    """Model name, flavor, tokenizer folder and dtype of a cairn step, where the user gave none."""
    from cairn.data.paths import resolve_path

    manifest, _ = read_manifest_quietly(src)
    if not manifest:
        return options
    model = manifest.get("model") or {}
    config_model = (manifest.get("config") or {}).get("model") or {}
    assets = options.hf_assets_path or config_model.get("hf_assets_path")
    if assets is None and config_model.get("tokenizer_path"):
        tokenizer = resolve_path(config_model["tokenizer_path"])
        assets = str(tokenizer.parent) if tokenizer is not None else None
    dtype = options.export_dtype
    if dtype is None and manifest.get("dtype") in EXPORT_DTYPES:
        dtype = manifest["dtype"]
    return dataclasses.replace(options, flavor=options.flavor or model.get("flavor"), hf_assets_path=assets,
                               export_dtype=dtype)


def convert_checkpoint(src: Path, dst: Path, to: str, options: ConvertOptions) -> dict:
    """Any of DCP / HF / .pt to any other; HF <-> .pt goes through a temporary DCP beside ``dst``.
    DCP to DCP re-casts (``export_dtype``) or keeps the model only (``model_only``)."""
    source = detect_format(src)
    if source == to and not (to == "dcp" and (options.export_dtype or options.model_only)):
        hint = " (to re-cast a DCP checkpoint pass --export_dtype, to keep the model only --model_only)" \
            if to == "dcp" else ""
        raise UsageError(f"already a {to} checkpoint; nothing to convert{hint}", src)
    if dst.exists() and (dst.is_file() or any(dst.iterdir())):
        raise UsageError("already exists; choose a new path (nothing is ever overwritten)", dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dtype = options.export_dtype
    if source == "dcp" and to == "dcp":
        return recast_dcp(src, dst, export_dtype=_torch_dtype(dtype), model_only=options.model_only,
                          progress=options.progress)
    if source == "dcp":
        options = _defaults_from_manifest(src, options)
    if source == "dcp" and to == "hf":
        return convert_dcp_to_hf(src, dst, model_name=options.model_name, flavor=options.flavor,
                                 hf_assets_path=options.hf_assets_path,
                                 export_dtype=options.export_dtype or "float32",
                                 max_shard_bytes=options.max_shard_bytes, progress=options.progress)
    if source == "hf" and to == "dcp":
        return convert_hf_to_dcp(src, dst, model_name=options.model_name, flavor=options.flavor, dtype=dtype,
                                 progress=options.progress)
    if source == "dcp" and to == "torch":
        return dcp_to_torch_file(src, dst, export_dtype=_torch_dtype(dtype), progress=options.progress)
    if source == "torch" and to == "dcp":
        return torch_file_to_dcp(src, dst, export_dtype=_torch_dtype(dtype), progress=options.progress)
    with _temporary_dir(dst) as middle:  # hf -> torch, torch -> hf
        first = dataclasses.replace(options, export_dtype=None, model_only=False)
        convert_checkpoint(src, middle / "dcp", "dcp", first)
        return convert_checkpoint(middle / "dcp", dst, to, options)


@contextlib.contextmanager
def _temporary_dir(beside: Path) -> Iterator[Path]:
    path = beside.parent / f".{beside.name}.convert-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _torch_dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else resolve_dtype(name)
