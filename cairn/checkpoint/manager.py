"""The checkpoint manager: when to save, what to save and load, from where. Any training loop can use it.

    manager = CheckpointManager(CheckpointManager.Config(enable=True, interval=100,
                                                         async_mode="async_with_pinned_mem"),
                                model_parts=[model], states={"optimizer": OptimizerState(model, opt),
                                                             "train_state": train_state},
                                base_folder="outputs")
    manager.load()                      # the newest committed step, if any
    for step in ...:
        ...                             # forward, backward
        manager.maybe_wait_for_staging()
        opt.step()
        manager.save(step, last_step=step == total)
    manager.close()

What a full checkpoint holds, as one flat DCP state dict: the model's FQNs at the top level
(so ``dcp_to_torch`` of a step gives a plain ``{fqn: tensor}`` model dict), then one entry per
state: ``{<model FQNs>: tensors, "optimizer": {...}, "train_state": {...}, ...}``. States are
any ``Stateful``; one that implements ``reseed(seed)`` (``state.RNGState``) is restored only
on the layout that saved it and re-seeded on any other.

With ``--checkpoint.memory_interval K`` every K-th step is also snapshotted into host memory
that outlives the process (``memory.py``); a restart resumes from the newest snapshot every
rank can get (its own, or a replica on the next node) when it is at least as new as the
newest committed step, else from the folder.

Load precedence (auto-resume): a memory snapshot as above; the newest committed step in the
folder (or ``--checkpoint.load_step``, which never takes a snapshot) wins, and then every ``initial_*`` option is ignored by design;
else ``--checkpoint.initial_load_path`` (or HF weights); else a fresh start.

Everything in the checkpoint folder goes through a store (``store.py``: a local or shared
folder, or ``s3://``); HF files through ``hf.py`` and the model's adapter. This module knows
no model names. Public methods check ``enable``/``load_only``; a disabled manager touches
nothing, needs no process group and loads nothing.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.stateful import Stateful

from cairn.checkpoint.api import BackgroundSaver, SaveHandle, save
from cairn.checkpoint.errors import CheckpointError, CorruptCheckpointError
from cairn.checkpoint.hf import load_hf, save_hf
from cairn.checkpoint.layout import FULL, HF, MODEL_ONLY, SEED, dtype_named
from cairn.checkpoint.lease import FolderLease
from cairn.checkpoint.memory import MemoryTier, default_dir, restore
from cairn.checkpoint.mirror import UploadWorker
from cairn.checkpoint.retention import RetentionWorker
from cairn.checkpoint.state import MODEL, ModelState, PerRankState, state_bytes
from cairn.checkpoint.store import local_folder, open_step, open_store
from cairn.config.job_config import CheckpointSection

logger = logging.getLogger("cairn")

# A replica exchange whose peer died fails after this long instead of holding the thread.
MEMORY_GROUP_TIMEOUT_S = 300

CheckpointConfig = CheckpointSection


class CheckpointManager:
    """Saves and restores a training run's state on a policy (interval, retention, async mode).

    ``model_parts``: the model, or its pipeline stages; ``states``: every other ``Stateful`` to
    save, by key (not "model"); ``base_folder``: what a relative ``config.folder`` is relative to.
    Everything a trainer knows comes in as optional arguments: ``sd_adapter`` (HF export/import),
    ``model_info`` (name/flavor, for the manifest and messages), ``run_info`` (JSON-able, into
    every manifest), ``total_steps`` (a model-only step at the end is a finished run, not a
    resume point), ``seed`` (re-seeding per-rank states on another layout), ``layout`` (the
    parallel layout, default the world size), ``tokenizer_dir`` (copied into HF exports),
    ``hf_assets_path`` (HF weights for ``initial_load_in_hf``), ``on_commit(step, location)``
    (on the coordinator, once a step is committed), ``process_group`` (saves and loads; the
    default group).
    """

    Config = CheckpointSection

    def __init__(self, config: CheckpointSection, *, model_parts: nn.Module | list[nn.Module],
                 states: dict[str, Stateful] | None = None, base_folder: str | Path = ".", sd_adapter: Any = None,
                 model_info: dict[str, Any] | None = None, run_info: dict[str, Any] | None = None,
                 total_steps: int | None = None, seed: int | None = None, layout: dict[str, Any] | None = None,
                 tokenizer_dir: str | Path | None = None, hf_assets_path: str | None = None,
                 on_commit: Callable[[int, str], None] | None = None,
                 process_group: dist.ProcessGroup | None = None):
        self.config = config
        self.enabled = config.enable
        self.model = ModelState(model_parts)
        self.states: dict[str, Stateful] = dict(states or {})
        if MODEL in self.states:
            raise ValueError("CheckpointManager: 'model' is not a state key (pass the model as model_parts)")
        self.sd_adapter = sd_adapter
        self.model_info = dict(model_info or {})
        self.run_info = dict(run_info or {})
        self.total_steps = total_steps
        self.seed = seed
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
        self.hf_assets_path = hf_assets_path
        self.on_commit = on_commit
        self.group = process_group
        self.checksums = True  # xxh3 of every file into the manifest (the benchmark turns it off for a pair)
        self.last_load: dict | None = None  # what load() restored (kind, path, bytes, seconds), for metrics
        self.last_save: SaveHandle | None = None
        self.load_phases: dict[str, float] = {}  # the last DCP load's parts, seconds (see _dcp_load)
        self.load_hash_wait_s: float | None = None  # the last verifying load's wait on its hashes
        self.async_saver: BackgroundSaver | None = None
        self._prepared = False
        self._deferred_from: int | None = None  # the step whose save is waiting for the previous one
        self._writing: set[int] = set()  # steps of saves in flight (retention never deletes them)
        self._lease: FolderLease | None = None
        self._retention: RetentionWorker | None = None
        self._uploads: UploadWorker | None = None
        self.mirror = None
        self._mirror_steps: set[int] = set()
        self.memory: MemoryTier | None = None
        self._finished = False  # the last step was saved: close() removes the memory snapshots
        if not self.enabled:
            return
        initialized = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank(self.group) if initialized else 0
        self.world_size = dist.get_world_size(self.group) if initialized else 1
        self.layout = dict(layout) if layout is not None else {"world_size": self.world_size}
        unprotected = config.s3_unsafe_no_conditional_writes
        self.store = open_store(config.folder, base_folder=base_folder, s3_unsafe_no_conditional_writes=unprotected)
        self.folder = self.store.url
        if config.upload_to:
            self.mirror = open_store(config.upload_to, s3_unsafe_no_conditional_writes=unprotected)
        self._agree(self._start_on_rank0 if self.rank == 0 else None)
        self._control = None
        if initialized and self.world_size > 1 and not config.load_only:
            # Whether the previous save is done (and the lease still held) is agreed on here, by
            # the training thread, never on the group the background saves use.
            self._control = dist.new_group(backend="gloo")
        if config.async_mode != "disabled" and not config.load_only:
            self.async_saver = BackgroundSaver(config.async_mode, writer=config.async_writer,
                                               device_snapshot=config.device_snapshot)
        if self.rank == 0 and config.keep_latest_k > 0 and not config.load_only:
            self._retention = RetentionWorker(self.store, config.keep_latest_k,
                                              protect=lambda: set(self._writing) | self._uploading(),
                                              busy=lambda: bool(self._writing))
        if self.rank == 0 and self.mirror is not None and not config.load_only:
            self._uploads = UploadWorker(self.store, self.mirror, config.keep_latest_k)
        if config.memory_interval > 0 and not config.load_only:
            self._open_memory_tier(initialized)
        self._barrier()

    def _open_memory_tier(self, initialized: bool) -> None:
        # The replicas travel on a gloo group of their own, used only by the snapshots' thread.
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=MEMORY_GROUP_TIMEOUT_S)) \
            if initialized and self.world_size > 1 else None
        directory = self.config.memory_dir or default_dir(self.folder)
        try:
            self.memory = MemoryTier(directory, rank=self.rank, world_size=self.world_size, layout=self.layout,
                                     replicas=self.config.memory_replicas, group=group)
        except OSError as e:
            raise CheckpointError(f"--checkpoint.memory_dir {directory}: {e.strerror or e}") from e

    # --- start-up -----------------------------------------------------------------------------

    def _start_on_rank0(self) -> None:
        """Check that a save can be written and committed (an object store's conditional writes
        are probed: one that ignores them is refused here, before anything is written), take the
        folder's lease, which every commit then confirms (the store's fence), and clean up what
        crashed saves left (never what a live run writes)."""
        if not self.config.load_only:
            self.store.check_writable()
            if self.mirror is not None:
                self.mirror.check_writable()
            self._lease = FolderLease.acquire(self.store)
            self.store.set_fence(self._lease.confirm)
            self.store.cleanup_incomplete()

    def _agree(self, work: Callable[[], None] | None) -> None:
        """Run ``work`` on this rank (rank 0 passes it) and raise its CheckpointError on every rank."""
        message = None
        if work is not None:
            try:
                work()
            except CheckpointError as e:
                message = e
        if self.world_size > 1:
            box = [None if message is None else (type(message).__name__, str(message))]
            dist.broadcast_object_list(box, src=0, group=self.group)
            if box[0] is not None and message is None:
                message = CheckpointError(box[0][1])
        if message is not None:
            self._release_lease()
            raise message

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    # --- saving -------------------------------------------------------------------------------

    def prepare_async(self) -> None:
        """Once, after the first step: check there is room for a step, and allocate the reused
        async staging buffers in the background."""
        if not self.enabled or self.config.load_only or self._prepared:
            return
        self._prepared = True
        state = self._full_state_dict()
        self._check_room(state_bytes(state))
        if self.memory is not None:
            self._check_memory_room(state_bytes(state))
            self.memory.prepare(state)
        if self.async_saver is not None:
            self.async_saver.prepare(state)

    def _check_memory_room(self, local_bytes: int) -> None:
        """The snapshots need room for their slots on every node: stop before training on if not."""
        problem = self.memory.room_problem(local_bytes)
        problems = [problem]
        if self.world_size > 1:
            problems = [None] * self.world_size
            dist.all_gather_object(problems, problem, group=self._gloo_group())
        found = [p for p in problems if p]
        if found:
            raise CheckpointError(f"--checkpoint.memory_dir: {found[0]}; lower --checkpoint.memory_replicas, point "
                                  "--checkpoint.memory_dir at a larger tmpfs, or set --checkpoint.memory_interval 0")

    def _check_room(self, local_bytes: int) -> None:
        """A step needs about the state's bytes (all ranks): refuse to train on if the folder has less."""
        total = torch.tensor([float(local_bytes)])
        if self.world_size > 1:
            dist.all_reduce(total, group=self._gloo_group())
        needed = int(total.item())
        free = getattr(self.store, "free_bytes", lambda: None)() if self.rank == 0 else None

        def check() -> None:
            if free is not None and free < needed:
                raise CheckpointError(f"--checkpoint.folder {self.folder} has {free / 1e9:.2f} GB free, but one "
                                      f"checkpoint of this run needs about {needed / 1e9:.2f} GB: free space there "
                                      "or point --checkpoint.folder elsewhere (stopped before any step was lost)")

        self._agree(check if self.rank == 0 else None)

    def _gloo_group(self):
        """A group for small CPU collectives of the training thread (the default one may be NCCL)."""
        if self._control is not None:
            return self._control
        if self.group is None and dist.get_backend() == "gloo":
            return None
        self._control = dist.new_group(backend="gloo")
        return self._control

    def _should_save(self, step: int, last_step: bool) -> bool:
        if last_step or step % self.config.interval == 0:
            return True
        return step == 1 and self.config.enable_first_step_checkpoint

    def save(self, step: int, last_step: bool = False, stopping: bool = False) -> dict | None:
        """Save if the policy says so; returns what was saved (for logs/metrics) or None.

        Call it after every step: it also takes the memory tier's snapshot when one is due
        (returned as ``kind`` "memory", or under ``"memory"`` beside a save of the same step).
        See ``_save_to_store`` for the folder's saves.
        """
        if not self.enabled or self.config.load_only:
            return None
        info = self._save_to_store(step, last_step, stopping)
        if self.memory is not None and not last_step:
            snapshot = self._snapshot(step)
            if snapshot is not None:
                info = snapshot if info is None else {**info, "memory": snapshot}
        if last_step:
            self._finished = True
        return info

    def _snapshot(self, step: int) -> dict | None:
        """The memory tier's snapshot, every ``memory_interval`` steps, skipped (on every rank)
        while the previous one is still in flight on any rank."""
        memory = self.memory
        memory.record_progress(step)
        if step % self.config.memory_interval:
            return None
        busy = memory.in_flight
        if self.world_size > 1:
            flag = torch.tensor([1 if busy else 0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._gloo_group())
            busy = bool(flag.item())
        if busy:
            logger.warning("memory snapshot of step %d skipped: the previous one is still in flight (a snapshot "
                           "every %d steps is more often than one takes)", step, self.config.memory_interval)
            return {"kind": "memory", "skipped": True}
        previous = dict(memory.last_seconds)
        start = time.perf_counter()
        state = self._full_state_dict()
        memory.snapshot(step, state)
        info = {"kind": "memory", "bytes": state_bytes(state), "stall_s": round(time.perf_counter() - start, 4),
                "replicas": memory.replicas}
        if previous:
            info["previous_s"] = {k: round(v, 4) for k, v in previous.items()}
        return info

    def _save_to_store(self, step: int, last_step: bool, stopping: bool) -> dict | None:
        """The folder's save if the policy says so.

        An async save that comes due while the previous one is still being written is deferred
        (``--checkpoint.when_busy defer``: training goes on, nothing waits) and taken at the first
        step after the previous one is committed; the returned dict says so (``deferred``, and
        later ``deferred_steps``). ``stopping`` (the run stops cleanly after this step) takes a
        due or deferred save now. The last step's save, a stopping one and every one under
        ``when_busy wait`` wait for the previous one (``waited_s``).
        """
        self.prepare_async()
        due = self._should_save(step, last_step)
        if not due and self._deferred_from is None:
            return None
        model_only = last_step and self.config.last_save_model_only
        must = last_step or stopping or self.config.when_busy == "wait"
        running, lost = self._save_status()
        if lost:
            raise CheckpointError(lost)
        if running and not must:
            if self._deferred_from is None:
                self._deferred_from = step
                logger.warning("checkpoint step %d: the previous save is still being written; this save is deferred "
                               "until it is committed (training goes on)", step)
                return {"kind": FULL, "deferred": True, "due_step": step}
            return None
        deferred_steps = step - self._deferred_from if self._deferred_from is not None else 0
        self._deferred_from = None
        start = time.perf_counter()
        waited = self._finish_in_flight() if (model_only or must) else 0.0
        if model_only or must:  # the folder may have been lost meanwhile (the commit's fence checks again)
            _, lost = self._save_status()
            if lost:
                raise CheckpointError(lost)
        if model_only:
            info = self._save_model_only(step, kind=HF if self.config.last_save_in_hf else MODEL_ONLY,
                                         dtype=self.config.export_dtype)
        else:
            info = self._save_full(step)
        info["stall_s"] = round(time.perf_counter() - start, 4)
        if waited:
            info["waited_s"] = round(waited, 4)
        if deferred_steps:
            info["deferred_steps"] = deferred_steps
        if last_step or stopping:
            self._finish_in_flight()
        logger.info("checkpoint step %d: %s save of %.1f MB%s to %s, training stalled %.3f s%s", step, info["kind"],
                    info["bytes"] / 1e6, self._per_rank(), self.store.step_url(step), info["stall_s"],
                    "; writing in the background" if info.get("async") and not last_step else "")
        return info

    def _save_status(self) -> tuple[bool, str | None]:
        """(whether the previous async save is still in flight on any rank, why the folder's lease
        was lost if it was), agreed by all ranks."""
        running = self.async_saver is not None and self.async_saver.in_flight
        lost = self._lease.lost if self._lease is not None else None
        if self.world_size > 1:
            flags = torch.tensor([1 if running else 0, 1 if lost else 0])
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self._gloo_group())
            running = bool(flags[0].item())
            if flags[1].item() and lost is None:
                lost = f"rank 0 lost the lease of checkpoint folder {self.folder} to another run"
        if lost is not None:
            lost = f"{lost}; this run saves nothing more there"
        return running, lost

    def save_seed(self) -> None:
        """Step 0: the freshly initialized model, for any later layout to start from."""
        if not self.enabled:
            return
        info = self._save_model_only(0, kind=SEED, dtype="float32")
        logger.info("seed checkpoint written to %s (%.1f MB)", self.store.step_url(0), info["bytes"] / 1e6)

    def _info(self, kind: str, dtype: str) -> dict:
        info = {"kind": kind, "dtype": dtype, "layout": self.layout}
        if self.model_info:
            info["model"] = self.model_info
        return {**self.run_info, **info}

    def _full_state_dict(self) -> dict[str, Any]:
        """A snapshot: tensors are live references (staged before they change), the rest copies."""
        state = dict(self.model.state_dict())
        for key, stateful in self.states.items():
            state[key] = stateful.state_dict()
        return state

    def _committed(self, step: int, location: str) -> None:
        if self.on_commit is not None:
            self.on_commit(step, location)

    def _after_commit(self, step: int) -> None:
        self._writing.discard(step)
        if self._uploads is not None:
            self._uploads.request(step)
        if self._retention is not None:
            self._retention.request()

    def _uploading(self) -> set[int]:
        """Steps the upload worker has yet to copy (retention keeps them until it has)."""
        return self._uploads.pending() if self._uploads is not None else set()

    def _save_full(self, step: int) -> dict:
        state = self._full_state_dict()
        info = self._info(FULL, "mixed")
        nbytes = state_bytes(state)
        self._writing.add(step)
        if self.async_saver is None:
            try:
                self.last_save = save(state, self.store, step, info=info, checksums=self.checksums,
                                      process_group=self.group, thread_count=self.config.write_threads,
                                      on_commit=self._committed)
            finally:
                self._writing.discard(step)
            self._after_commit(step)
        else:
            started = time.perf_counter()

            def after_commit() -> None:
                logger.info("checkpoint step %d: background write of %.1f MB to %s committed %.2f s after the save "
                            "began", step, nbytes / 1e6, self.store.step_url(step), time.perf_counter() - started)
                self._after_commit(step)

            self.last_save = self.async_saver.save(state, self.store, step, info=info, checksums=self.checksums,
                                                   on_commit=self._committed, after_commit=after_commit,
                                                   thread_count=self.config.write_threads)
        return {"kind": FULL, "bytes": nbytes, "async": self.async_saver is not None}

    def _save_model_only(self, step: int, *, kind: str, dtype: str) -> dict:
        self._finish_in_flight()
        torch_dtype = dtype_named(dtype)
        state = {k: v.to(torch_dtype) if torch.is_floating_point(v) else v
                 for k, v in self.model.state_dict().items()}
        info = self._info(kind, dtype)
        if kind == HF:
            if self.sd_adapter is None:
                raise CheckpointError("--checkpoint.last_save_in_hf needs a state dict adapter (sd_adapter=...) to "
                                      "name the weights the Hugging Face way")
            save_hf(state, None, self.sd_adapter, dtype=torch_dtype, tokenizer_dir=self.tokenizer_dir, info=info,
                    storage=self.store, step=step)
            self._after_commit(step)
        else:
            self.last_save = save(state, self.store, step, info=info, checksums=self.checksums,
                                  process_group=self.group, on_commit=self._committed)
            self._after_commit(step)
        return {"kind": kind, "bytes": state_bytes(state), "async": False}

    def maybe_wait_for_staging(self) -> None:
        """Call before the optimizer step: the staged copy must be taken first."""
        if self.async_saver is not None:
            self.async_saver.wait_for_staging()
        if self.memory is not None:
            self.memory.wait_for_staging()

    def _finish_in_flight(self) -> float:
        """Wait for the save in flight (if any); returns the seconds waited."""
        if self.async_saver is None or not self.async_saver.in_flight:
            if self.async_saver is not None:
                self.async_saver.wait()  # raises a failed save's error
            return 0.0
        start = time.perf_counter()
        self.async_saver.wait()
        return time.perf_counter() - start

    def close(self) -> None:
        """Finish the save in flight, stop the background workers, give the folder's lease back.
        A run whose last step was saved removes its memory snapshots; any other keeps them."""
        try:
            if self.async_saver is not None:
                self.async_saver.close()
                self.async_saver = None
        finally:
            if self.memory is not None:
                self.memory.close(remove=self._finished)
                self.memory = None
            if self._uploads is not None:
                self._uploads.close()
                self._uploads = None
            if self._retention is not None:
                self._retention.close()
                self._retention = None
            self._release_lease()

    def _release_lease(self) -> None:
        if self._lease is not None:
            self.store.set_fence(None)
            self._lease.release()
            self._lease = None

    def _per_rank(self) -> str:
        """Byte counts in logs are this rank's (its shards), not the checkpoint's total: say so."""
        return " (this rank's shards)" if self.world_size > 1 else ""

    # --- loading ------------------------------------------------------------------------------

    def load(self, step: int | None = None) -> bool:
        """Restore the newest (or ``step``, or ``--checkpoint.load_step``) checkpoint; True if anything was loaded."""
        if not self.enabled:
            return False
        config = self.config
        steps = self._committed_anywhere()
        wanted = step if step is not None else (config.load_step if config.load_step != -1 else None)
        if wanted is not None:
            if wanted not in steps:
                places = self.folder + (f" and {self.mirror.url}" if self.mirror is not None else "")
                where = (f"checkpoint.folder {self.folder} does not exist" if not steps and not self.store.exists()
                         else f"committed steps in {places}: {steps or 'none'}")
                raise CheckpointError(f"--checkpoint.load_step={wanted} not found: {where}")
            return self._load_step(wanted, explicit=True)
        if self.memory is not None and self._restore_from_memory(steps):
            return True
        if steps:
            return self._load_newest(steps)
        if config.initial_load_in_hf:
            return self._load_hf(config.initial_load_path or self.hf_assets_path)
        if config.initial_load_path:
            return self._load_initial(config.initial_load_path)
        logger.info("no checkpoint in %s: starting from freshly initialized weights", self.folder)
        return False

    def _load_newest(self, steps: list[int]) -> bool:
        """Auto-resume. A corrupt newest step stops the job unless --checkpoint.fallback_on_corrupt."""
        candidates = list(reversed(steps))
        newest_kind = self._kind(candidates[0])
        if newest_kind in (MODEL_ONLY, HF) and (self.total_steps is None or candidates[0] < self.total_steps):
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

    def _restore_from_memory(self, steps: list[int]) -> bool:
        """Resume from the memory tier when it holds a step at least as new as the folder's newest."""
        if self.config.exclude_from_loading:
            logger.info("--checkpoint.exclude_from_loading is set: resuming from the folder, not from memory")
            return False
        disk = steps[-1] if steps else None
        restored = restore(self.memory, disk, self._full_state_dict, self._apply_full,
                           group=self._gloo_group() if self.world_size > 1 else None)
        if restored is None:
            if self.rank == 0 and disk is not None:
                logger.info("no memory snapshot at or after step-%d in %s: resuming from the folder", disk,
                            self.memory.dir)
            return False
        lost = restored["steps_lost"]
        logger.info("restored step %d from host %s in %.2f s (%s%s); the folder's newest step is %s",
                    restored["from_step"], "memory and replicas" if restored["tier"] == "replica" else "memory",
                    restored["seconds"], f"{restored['bytes'] / 1e6:.1f} MB{self._per_rank()}",
                    f", {lost} step(s) lost" if lost is not None else "",
                    f"step-{disk}" if disk is not None else "none")
        self.last_load = {"kind": FULL, "explicit": False, "disk_step": disk, **restored}
        return True

    def _apply_full(self, state: dict[str, Any]) -> None:
        """Hand a full state dict (model FQNs and one entry per state) to the model and the states."""
        self.model.load_state_dict({k: v for k, v in state.items() if k not in self.states})
        for key, stateful in self.states.items():
            stateful.load_state_dict(state[key])

    def _committed_anywhere(self) -> list[int]:
        """Committed steps of the folder and, with --checkpoint.upload_to, of the mirror."""
        self._mirror_steps = set(self.mirror.committed_steps()) if self.mirror is not None else set()
        return sorted(set(self.store.committed_steps()) | self._mirror_steps)

    def _store_of(self, step: int):
        """Where step ``step`` is read from: the folder when it holds it, else the mirror."""
        if self.mirror is not None and step in self._mirror_steps \
                and step not in self.store.committed_steps():
            return self.mirror
        return self.store

    def _kind(self, step: int) -> str:
        manifest = self._store_of(step).read_manifest(step) or {}
        return manifest.get("kind", SEED if step == 0 else FULL)

    def _load_step(self, step: int, *, explicit: bool) -> bool:
        store = self._store_of(step)
        manifest = store.read_manifest(step) or {}
        kind = manifest.get("kind", SEED if step == 0 else FULL)
        location = store.step_url(step)
        start = time.perf_counter()
        if kind == HF:
            with store.local_copy(step) as local:
                nbytes = self._read_hf(local)
        elif kind in (MODEL_ONLY, SEED):
            nbytes = self._dcp_load(store, step, include_states=())
        else:
            keys = [k for k in self.states if k not in self.config.exclude_from_loading]
            saved_layout = manifest.get("layout")
            if saved_layout is not None and saved_layout != self.layout:
                for key in [k for k in keys if isinstance(self.states[k], PerRankState)]:
                    logger.warning("step-%d was saved with layout %s, this run is %s: %s is re-seeded per rank "
                                   "instead of restored", step, saved_layout, self.layout, key)
                    keys.remove(key)
                    self.states[key].reseed(self.seed if self.seed is not None else 0)
            nbytes = self._dcp_load(store, step, include_states=keys)
        seconds = time.perf_counter() - start
        logger.info("loaded %s checkpoint %s: %.1f MB%s in %.2f s", kind, location, nbytes / 1e6, self._per_rank(),
                    seconds)
        self.last_load = {"kind": kind, "from_step": step, "path": location, "bytes": nbytes,
                          "seconds": round(seconds, 4), "tier": "disk" if store.scheme == "file" else "object",
                          "explicit": explicit}
        if kind != HF:
            self.last_load["phases"] = self.load_phases
        return True

    def _load_initial(self, path: str) -> bool:
        store, step = open_step(path, "--checkpoint.initial_load_path")
        states = () if self.config.initial_load_model_only else [
            k for k in self.states if k not in self.config.exclude_from_loading]
        start = time.perf_counter()
        nbytes = self._dcp_load(store, step, include_states=states)
        seconds = time.perf_counter() - start
        logger.info("loaded initial checkpoint %s (%s): %.1f MB%s in %.2f s", path,
                    "model only" if not states else "model, " + ", ".join(states), nbytes / 1e6, self._per_rank(),
                    seconds)
        self.last_load = {"kind": "initial", "path": str(path), "bytes": nbytes, "seconds": round(seconds, 4)}
        return True

    def _load_hf(self, path: str) -> bool:
        flag = "--checkpoint.initial_load_path" if self.config.initial_load_path else "--model.hf_assets_path"
        start = time.perf_counter()
        with local_folder(path, flag) as local:
            if not local.is_dir():
                raise CheckpointError(f"{flag} {path}: not a Hugging Face folder (no such directory)")
            nbytes = self._read_hf(local)
        seconds = time.perf_counter() - start
        logger.info("loaded Hugging Face weights from %s: %.1f MB in %.2f s", path, nbytes / 1e6, seconds)
        self.last_load = {"kind": "hf", "path": str(path), "bytes": nbytes, "seconds": round(seconds, 4)}
        return True

    def _read_hf(self, path: Path) -> int:
        """Model weights from a local HF directory; returns the bytes this rank read."""
        if self.sd_adapter is None:
            raise CheckpointError(f"loading Hugging Face weights from {path} needs a state dict adapter "
                                  "(sd_adapter=...)")
        state = self.model.state_dict()
        result = load_hf(state, path, self.sd_adapter)
        self.model.load_state_dict(state)
        return result["bytes"]

    def _dcp_load(self, store, step, include_states) -> int:
        """Load the model (and ``include_states``) from a DCP step; returns the tensor bytes this rank loaded.

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
        where = store.step_url(step) if isinstance(step, int) else getattr(step, "where", str(step))
        self._check_against_metadata(where, store.reader(step), state)
        lap("check")
        # store.load re-raises a corrupt file as CorruptCheckpointError on every rank.
        reader = store.load(state, step, verify=self.config.verify, process_group=self.group,
                            no_dist=self.world_size == 1 and not dist.is_initialized())
        lap("read")
        self.load_hash_wait_s = getattr(reader, "hash_wait_s", None)
        nbytes = state_bytes({k: v for k, v in state.items() if k not in self.states})
        nbytes += state_bytes({k: state[k] for k in include_states})
        self.model.load_state_dict({k: v for k, v in state.items() if k not in self.states})
        for key in include_states:
            try:
                self.states[key].load_state_dict(state[key])
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{where}: cannot restore {key!r}: {e}") from e
        lap("restore")
        self.load_phases = phases
        return nbytes

    def _check_against_metadata(self, where: str, reader, state: dict) -> None:
        """Name every missing key and shape mismatch before DCP reads a byte."""
        saved = reader.read_metadata().state_dict_metadata
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
            flavor = self.model_info.get("flavor")
            which = f" (--model.flavor {flavor})" if flavor else ""
            raise CheckpointError(f"{where} does not match this model{which}:\n  - " + "\n  - ".join(shown))
