"""The checkpoint manager: when to save, what to save and load, from where.

Everything on disk goes through ``CheckpointStorage`` (staged writes, checksums, atomic
commit, safe reads); HF files through ``cairn.checkpoint.hf`` and the model's own adapter.
This module knows no model names.

What a full checkpoint holds, as one flat DCP state dict:
``{<model FQNs>: tensors, "optimizer": {...}, "lr_scheduler": {...}, "dataloader": {...},
"train_state": {...}, "rng": {"rank_<r>": {...}}}``. Model keys sit at the top level, so
``dcp_to_torch`` of a step gives a plain ``{fqn: tensor}`` model dict.

Load precedence (auto-resume): the newest committed ``step-N`` in the folder (or
``--checkpoint.load_step``) wins, and then every ``initial_*`` option is ignored by
design; else ``--checkpoint.initial_load_path`` (or HF weights); else a fresh start.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from cairn.checkpoint.planner import BytesMemo, CairnSavePlanner
from cairn.checkpoint.staging import AsyncSaver
from cairn.checkpoint.storage import CheckpointError, CheckpointStorage, CorruptCheckpointError
from cairn.config.job_config import CheckpointSection, JobConfig
from cairn.config.manager import to_dict

logger = logging.getLogger("cairn")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FULL, MODEL_ONLY, SEED, HF = "full", "model_only", "seed", "hf"


class ModelWrapper(Stateful):
    """The model parts (pipeline stages) as one FQN-keyed state dict."""

    def __init__(self, model_parts: list[nn.Module]):
        self.model_parts = model_parts

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in self.model_parts:
            out.update(get_model_state_dict(part))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part in self.model_parts:
            keys = get_model_state_dict(part).keys()
            set_model_state_dict(part, {k: state_dict[k] for k in keys}, options=StateDictOptions(strict=True))


def _per_rank() -> str:
    """Byte counts in logs are this rank's (its shards), not the checkpoint's total: say so."""
    return " (this rank's shards)" if dist.is_initialized() and dist.get_world_size() > 1 else ""


def _bytes_of(state_dict: dict) -> int:
    total = 0
    for value in state_dict.values():
        if isinstance(value, dict):
            total += _bytes_of(value)
        elif isinstance(value, torch.Tensor):
            local = value.to_local() if hasattr(value, "to_local") else value
            total += local.numel() * local.element_size()
    return total


class CheckpointManager:
    Config = CheckpointSection

    def __init__(self, config: CheckpointSection, *, job_config: JobConfig, dump_folder: str,
                 model_parts: list[nn.Module], optimizers, lr_schedulers, dataloader, train_state, rng,
                 parallel_dims, model_spec, model_args, tokenizer_path: str | Path | None = None):
        self.config = config
        self.job_config = job_config
        self.enabled = config.enable
        self.model = ModelWrapper(model_parts)
        self.states: dict[str, Stateful] = {"optimizer": optimizers, "lr_scheduler": lr_schedulers,
                                            "dataloader": dataloader, "train_state": train_state, "rng": rng}
        self.train_state, self.rng = train_state, rng
        self.parallel_dims = parallel_dims
        self.model_spec, self.model_args = model_spec, model_args
        self.tokenizer_dir = Path(tokenizer_path).parent if tokenizer_path else None
        self.rank = dist.get_rank()
        self.async_saver: AsyncSaver | None = None
        self._async_prepared = False
        self.last_load: dict | None = None  # what load() restored (kind, path, bytes, seconds), for metrics
        self.load_phases: dict[str, float] = {}  # the last DCP load's parts, seconds (see _dcp_load)
        self._purge_thread: threading.Thread | None = None
        if not self.enabled:
            return
        folder = Path(config.folder)
        self.folder = folder if folder.is_absolute() else Path(dump_folder) / folder
        self.storage = CheckpointStorage(self.folder)
        if self.rank == 0:
            self.storage.cleanup_incomplete()
        if config.async_mode != "disabled" and not config.load_only:
            # Background saves run their collectives on a group of their own, so they never
            # interleave with the training step's collectives on the default group.
            self.async_group = dist.new_group(backend="gloo")
            self.async_saver = AsyncSaver(reuse_buffers=config.async_mode == "async_with_pinned_mem",
                                          writer=config.async_writer, device_snapshot=config.device_snapshot)
            self._bytes_memo = BytesMemo()  # used by the save worker thread only
        dist.barrier()

    # --- saving -------------------------------------------------------------------------

    def prepare_async(self) -> None:
        """Once, after the first step: allocate the reused async staging buffers in the background."""
        if self.async_saver is not None and not self._async_prepared:
            self._async_prepared = True
            self.async_saver.prepare(self._full_state_dict())

    def _should_save(self, step: int, last_step: bool) -> bool:
        if not self.enabled or self.config.load_only:
            return False
        if last_step or step % self.config.interval == 0:
            return True
        return step == 1 and self.config.enable_first_step_checkpoint

    def save(self, step: int, last_step: bool = False) -> dict | None:
        """Save if the policy says so; returns what was saved (for logs/metrics) or None."""
        self.prepare_async()
        if not self._should_save(step, last_step):
            return None
        start = time.perf_counter()
        if last_step and self.config.last_save_model_only:
            info = self._save_model_only(step, kind=HF if self.config.last_save_in_hf else MODEL_ONLY,
                                         dtype=self.config.export_dtype)
        else:
            info = self._save_full(step)
        info["stall_s"] = round(time.perf_counter() - start, 4)
        if last_step:
            self._finish_in_flight()
        logger.info("checkpoint step %d: %s save of %.1f MB%s to %s, training stalled %.3f s%s", step, info["kind"],
                    info["bytes"] / 1e6, _per_rank(), self.storage.step_dir(step), info["stall_s"],
                    "; writing in the background" if info.get("async") and not last_step else "")
        return info

    def save_seed(self) -> None:
        """Step 0: the freshly initialized model, for any later layout to start from."""
        info = self._save_model_only(0, kind=SEED, dtype="float32")
        logger.info("seed checkpoint written to %s (%.1f MB)", self.storage.step_dir(0), info["bytes"] / 1e6)

    def _info(self, kind: str, dtype: str) -> dict:
        return {"kind": kind, "dtype": dtype, "layout": self.parallel_dims.degrees,
                "model": {"name": self.model_spec.name, "flavor": self.job_config.model.flavor},
                "config": to_dict(self.job_config)}

    def _full_state_dict(self) -> dict[str, Any]:
        """A snapshot: tensors are live references (staged before they change), the rest copies."""
        state = dict(self.model.state_dict())
        for key, stateful in self.states.items():
            state[key] = stateful.state_dict()
        return state

    def _save_full(self, step: int) -> dict:
        state = self._full_state_dict()
        info = self._info(FULL, "mixed")
        nbytes = _bytes_of(state)
        if self.async_saver is None:
            dcp.save(state, storage_writer=self.storage.writer(step, info, thread_count=self.config.write_threads),
                     planner=None)
            self._purge_async(step)
        else:
            writer = self.storage.writer(step, info, thread_count=self.config.write_threads)
            if self.async_saver.writer_process is not None:
                writer.delegate = self.async_saver.write_data
            started = time.perf_counter()

            def write(staged: dict) -> None:
                dcp.save(staged, storage_writer=writer, process_group=self.async_group,
                         planner=CairnSavePlanner(self._bytes_memo))
                logger.info("checkpoint step %d: background write of %.1f MB to %s committed %.2f s after the "
                            "save began", step, nbytes / 1e6, writer.final_dir, time.perf_counter() - started)
                self._purge_now(protect=())

            self.async_saver.submit(step, state, write)
        return {"kind": FULL, "bytes": nbytes, "async": self.async_saver is not None}

    def _save_model_only(self, step: int, *, kind: str, dtype: str) -> dict:
        self._finish_in_flight()
        torch_dtype = _DTYPES[dtype]
        state = {k: v.to(torch_dtype) if torch.is_floating_point(v) else v
                 for k, v in self.model.state_dict().items()}
        info = self._info(kind, dtype)
        if kind == HF:
            from cairn.checkpoint.hf import save_hf

            adapter = self.model_spec.state_dict_adapter(self.model_args)
            save_hf(state, self.storage.step_dir(step), adapter, dtype=torch_dtype,
                    tokenizer_dir=self.tokenizer_dir, info=info, storage=self.storage, step=step)
        else:
            dcp.save(state, storage_writer=self.storage.writer(step, info))
        self._purge_async(step)
        return {"kind": kind, "bytes": _bytes_of(state), "async": False}

    def maybe_wait_for_staging(self) -> None:
        """Called before the optimizer step: the staged copy must be taken first."""
        if self.async_saver is not None:
            self.async_saver.wait_for_staging()

    def _finish_in_flight(self) -> None:
        if self.async_saver is not None:
            self.async_saver.wait()

    def _purge_now(self, protect) -> None:
        if self.rank == 0 and self.config.keep_latest_k > 0:
            self.storage.purge(self.config.keep_latest_k, protect=protect)

    def _purge_async(self, step: int) -> None:
        if self.rank != 0 or self.config.keep_latest_k <= 0:
            return
        if self._purge_thread is not None:
            self._purge_thread.join()
        self._purge_thread = threading.Thread(target=self._purge_now, args=((step,),), daemon=True,
                                              name="cairn-purge")
        self._purge_thread.start()

    def close(self) -> None:
        if self.async_saver is not None:
            self.async_saver.close()
            self.async_saver = None
        if self._purge_thread is not None:
            self._purge_thread.join()
            self._purge_thread = None

    # --- loading ------------------------------------------------------------------------

    def load(self) -> bool:
        """Restore the newest (or requested) checkpoint; returns True if anything was loaded."""
        if not self.enabled:
            return False
        config = self.config
        steps = self.storage.committed_steps()
        if config.load_step != -1:
            if config.load_step not in steps:
                where = (f"checkpoint.folder {self.folder} does not exist" if not self.folder.exists()
                         else f"committed steps in {self.folder}: {steps or 'none'}")
                raise CheckpointError(f"--checkpoint.load_step={config.load_step} not found: {where}")
            return self._load_step(config.load_step, explicit=True)
        if steps:
            return self._load_newest(steps)
        if config.initial_load_in_hf:
            path = config.initial_load_path or self.job_config.model.hf_assets_path
            return self._load_hf(Path(path))
        if config.initial_load_path:
            return self._load_initial(Path(config.initial_load_path))
        logger.info("no checkpoint in %s: starting from freshly initialized weights", self.folder)
        return False

    def _load_newest(self, steps: list[int]) -> bool:
        """Auto-resume. A corrupt newest step stops the job unless --checkpoint.fallback_on_corrupt."""
        candidates = list(reversed(steps))
        total_steps = self.job_config.training.steps
        newest_kind = self._kind(candidates[0])
        if newest_kind in (MODEL_ONLY, HF) and candidates[0] < total_steps:
            full_steps = [s for s in candidates if self._kind(s) == FULL]
            if full_steps:
                logger.warning("step-%d is a model-only export; resuming the training state from step-%d",
                               candidates[0], full_steps[0])
                candidates = full_steps
        for i, step in enumerate(candidates):
            try:
                return self._load_step(step, explicit=False)
            except CorruptCheckpointError as e:
                older = candidates[i + 1] if i + 1 < len(candidates) else None
                if self.config.fallback_on_corrupt and older is not None:
                    logger.error("step-%d is corrupt (%s); falling back to step-%d", step, e, older)
                    continue
                hint = (f"; to resume from the previous step pass --checkpoint.load_step {older} "
                        "(or --checkpoint.fallback_on_corrupt)" if older is not None else "")
                raise CorruptCheckpointError(f"{e}{hint}", getattr(e, "problems", [])) from e
        return False

    def _kind(self, step: int) -> str:
        manifest = self.storage.read_manifest(self.storage.step_dir(step)) or {}
        return manifest.get("kind", SEED if step == 0 else FULL)

    def _load_step(self, step: int, *, explicit: bool) -> bool:
        step_dir = self.storage.step_dir(step)
        manifest = self.storage.read_manifest(step_dir) or {}
        kind = manifest.get("kind", SEED if step == 0 else FULL)
        start = time.perf_counter()
        if kind == HF:
            nbytes = self._read_hf(step_dir)
        elif kind in (MODEL_ONLY, SEED):
            nbytes = self._dcp_load(step_dir, include_states=())
        else:
            keys = [k for k in self.states if k not in self.config.exclude_from_loading]
            saved_layout = manifest.get("layout")
            if "rng" in keys and saved_layout is not None and saved_layout != self.parallel_dims.degrees:
                logger.warning("step-%d was saved with layout %s, this run is %s: RNG states are re-seeded per "
                               "rank instead of restored", step, saved_layout, self.parallel_dims.degrees)
                keys.remove("rng")
                self.rng.reseed(self.job_config.debug.seed)
            nbytes = self._dcp_load(step_dir, include_states=keys)
        if kind in (MODEL_ONLY, HF) and not explicit and step >= self.job_config.training.steps:
            self.train_state.step = step  # a finished run: the loop has nothing left to do
        seconds = time.perf_counter() - start
        logger.info("loaded %s checkpoint %s: %.1f MB%s in %.2f s (training step now %d)", kind, step_dir,
                    nbytes / 1e6, _per_rank(), seconds, self.train_state.step)
        self.last_load = {"kind": kind, "from_step": step, "path": str(step_dir), "bytes": nbytes,
                          "seconds": round(seconds, 4)}
        if kind != HF:
            self.last_load["phases"] = self.load_phases
        return True

    def _load_initial(self, path: Path) -> bool:
        if not path.exists():
            raise CheckpointError(f"--checkpoint.initial_load_path {path}: no such directory")
        states = () if self.config.initial_load_model_only else [
            k for k in self.states if k not in self.config.exclude_from_loading]
        start = time.perf_counter()
        nbytes = self._dcp_load(path, include_states=states)
        seconds = time.perf_counter() - start
        logger.info("loaded initial checkpoint %s (%s): %.1f MB%s in %.2f s", path,
                    "model only" if not states else "model, " + ", ".join(states), nbytes / 1e6, _per_rank(), seconds)
        self.last_load = {"kind": "initial", "path": str(path), "bytes": nbytes, "seconds": round(seconds, 4)}
        return True

    def _load_hf(self, path: Path) -> bool:
        start = time.perf_counter()
        nbytes = self._read_hf(path)
        seconds = time.perf_counter() - start
        logger.info("loaded Hugging Face weights from %s: %.1f MB in %.2f s", path, nbytes / 1e6, seconds)
        self.last_load = {"kind": "hf", "path": str(path), "bytes": nbytes, "seconds": round(seconds, 4)}
        return True

    def _read_hf(self, path: Path) -> int:
        """Model weights from an HF directory; returns the bytes this rank read."""
        from cairn.checkpoint.hf import load_hf

        adapter = self.model_spec.state_dict_adapter(self.model_args)
        state = self.model.state_dict()
        result = load_hf(state, path, adapter)
        self.model.load_state_dict(state)
        return result["bytes"]

    def _dcp_load(self, path: Path, include_states) -> int:
        """Load the model (and ``include_states``) from a DCP dir; returns the tensor bytes this rank loaded.

        ``self.load_phases`` gets the seconds of each part: ``state_dict`` (the state to load
        into), ``check`` (metadata read and matched), ``read`` (the files read into it),
        ``restore`` (handed to the model and the other states).
        """
        phases: dict[str, float] = {}
        mark = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            phases[name] = round(now - mark, 4)
            mark = now

        state: dict[str, Any] = dict(self.model.state_dict())
        for key in include_states:
            state[key] = self.states[key].state_dict()
        lap("state_dict")
        self._check_against_metadata(path, self.storage.reader(path), state)
        lap("check")
        # storage.load re-raises a corrupt file as CorruptCheckpointError on every rank.
        self.storage.load(state, path, verify=self.config.verify)
        lap("read")
        nbytes = _bytes_of(state)
        self.model.load_state_dict({k: v for k, v in state.items() if k not in self.states})
        for key in include_states:
            try:
                self.states[key].load_state_dict(state[key])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{path}: cannot restore {key!r}: {e}") from e
        lap("restore")
        self.load_phases = phases
        return nbytes

    def _check_against_metadata(self, path: Path, reader, state: dict) -> None:
        """Name every missing key and shape mismatch before DCP reads a byte."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        metadata = reader.read_metadata()
        saved = metadata.state_dict_metadata
        problems = []
        for key, value in state.items():
            if key in self.states:
                if not any(k == key or k.startswith(key + ".") for k in saved):
                    problems.append(f"{key!r} is not in the checkpoint (saved model-only?); "
                                    f"add it to --checkpoint.exclude_from_loading to skip it")
                continue
            if key not in saved:
                problems.append(f"model key {key!r} is missing")
            elif isinstance(saved[key], TensorStorageMetadata) and tuple(saved[key].size) != tuple(value.shape):
                problems.append(f"{key}: checkpoint shape {tuple(saved[key].size)} != model shape "
                                f"{tuple(value.shape)}")
        if problems:
            shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
            raise CheckpointError(f"{path} does not match this model (--model.flavor "
                                  f"{self.job_config.model.flavor}):\n  - " + "\n  - ".join(shown))
