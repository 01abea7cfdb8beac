"""The checkpoint manager: when to save, what to save and load, from where. Any training loop can use it.

    manager = CheckpointManager(CheckpointManager.Config(enable=True, interval=100,
                                                         async_mode="async_with_pinned_mem"),
                                model_parts=[model], states={"optimizer": OptimizerState(model, opt)},
                                base_folder="outputs")   # steps go to outputs/checkpoint (Config.folder)
    loaded = manager.load()             # a LoadResult: .step, .tier, .source; false if nothing was loaded
    for step in range((loaded.step or 0) + 1, total + 1):
        ...                             # forward, backward
        manager.maybe_wait_for_staging()
        opt.step()
        result = manager.save(step, last_step=step == total)   # a SaveResult: .action, .reason
    manager.close()

The Config is checked when the manager is built (one CheckpointConfigError listing every
problem, each naming its field); messages name fields the library's way (``Config.interval``),
which cairn's trainer turns into its flags (``--checkpoint.interval``).

When a save comes due while the previous async save is still being written, ``when_busy``
decides: ``wait`` (the default: training waits for it, so no due save is skipped or late),
``coalesce`` (this step's state is staged into a second set of buffers and written next) or
``defer`` (the save is taken at the first step after the previous one commits). The result
of every ``save()`` says which, and how many steps a crash would lose at that moment.

What a full checkpoint holds, as one flat DCP state dict: the model's FQNs at the top level
(so ``dcp_to_torch`` of a step gives a plain ``{fqn: tensor}`` model dict), then one entry per
state: ``{<model FQNs>: tensors, "optimizer": {...}, "train_state": {...}, ...}``. States are
any ``Stateful``; one that implements ``reseed(seed)`` (``state.RNGState``) is restored only
on the layout that saved it and re-seeded on any other.

With ``Config.memory_interval = K`` every K-th step is also snapshotted into host memory
that outlives the process (``memory.py``); a restart resumes from the newest snapshot every
rank can get (its own, or a replica on the next node) when it is at least as new as the
newest committed step, else from the folder.

Load precedence (auto-resume): a memory snapshot as above; the newest committed step in the
folder (or ``Config.load_step``, which never takes a snapshot) wins, and then every ``initial_*``
option is ignored by design; else ``Config.initial_load_path`` (or HF weights); else a fresh start.

Everything in the checkpoint folder goes through a store (``store.py``: a local or shared
folder, or ``s3://``); HF files through ``hf.py`` and the model's adapter. This module knows
no model names. Public methods check ``enable``/``load_only``; a disabled manager touches
nothing, needs no process group and loads nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from cairn.checkpoint.api import (
    BackgroundSaver,
    Hold,
    SaveHandle,
    mismatch_error,
    mismatches,
    save,
    single_process_dcp,
)
from cairn.checkpoint.errors import (CheckpointConfigError, CheckpointError, CorruptCheckpointError, WriterDiedError,
                                    find_checkpoint_error, first_line)
from cairn.checkpoint.groups import describe, flat_tensors, grouped_tensors, load_problems
from cairn.checkpoint.hf import load_hf, save_hf
from cairn.checkpoint.layout import FULL, HF, MODEL_ONLY, SEED, dtype_named
from cairn.checkpoint.lease import FolderLease
from cairn.checkpoint.memory import MemoryTier, restore
from cairn.checkpoint.memory_slots import (default_dir, new_run_id, open_private_dir, read_run, remove_other_configs,
                                           run_identity)
from cairn.checkpoint.mirror import UploadWorker
from cairn.checkpoint.results import NOTHING_LOADED, LoadResult, SaveResult
from cairn.checkpoint.retention import RetentionWorker
from cairn.checkpoint.state import MODEL, ModelState, PerRankState, state_bytes
from cairn.checkpoint.store import is_object_uri, local_folder, open_step, open_store
from cairn.config.job_config import CheckpointSection

logger = logging.getLogger("cairn")

# A replica exchange whose peer died fails after this long instead of holding the thread.
MEMORY_GROUP_TIMEOUT_S = 300
# when_busy wait: a wait for the previous save longer than this is a warning (shorter ones are
# the tail of a save that was just finishing).
WAIT_WARNING_S = 0.05

CheckpointConfig = CheckpointSection


class CheckpointManager:
    """Saves and restores a training run's state on a policy (interval, retention, async mode).

    ``model_parts``: the model, or its pipeline stages; ``states``: every other ``Stateful`` to
    save, by key (not "model"); ``base_folder``: what a relative ``config.folder`` is relative to.
    Everything a trainer knows comes in as optional arguments: ``sd_adapter`` (HF export/import),
    ``model_info`` (name/flavor, for the manifest and messages), ``run_info`` (JSON-able, into
    every manifest; its ``"resume_config"``, kept out of the manifest, is the part of the run
    config a resume depends on: the memory tier restores no snapshot of another run's),
    ``total_steps`` (a model-only step at the end is a finished run, not a resume point),
    ``seed`` (re-seeding per-rank states on another layout), ``layout`` (the parallel layout,
    default the world size), ``tokenizer_dir`` (copied into HF exports), ``hf_assets_path`` (HF
    weights for ``initial_load_in_hf``), ``on_commit(step, location)`` (on the coordinator, once
    a step is committed), ``process_group`` (saves and loads; the default group). Raises
    CheckpointConfigError listing every problem of ``config``.
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
        problems = config.problems(states=self.states)
        if problems:
            raise CheckpointConfigError(problems)
        self.sd_adapter = sd_adapter
        self.model_info = dict(model_info or {})
        self.run_info = dict(run_info or {})
        self.resume_config = self.run_info.pop("resume_config", None)
        self.total_steps = total_steps
        self.seed = seed
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
        self.hf_assets_path = hf_assets_path
        self.on_commit = on_commit
        self.group = process_group
        self.checksums = True  # xxh3 of every file into the manifest (the benchmark turns it off for a pair)
        self.last_load: dict | None = None  # what load() restored (kind, path, bytes, seconds), for metrics
        self.last_save: SaveHandle | None = None  # the handle of the newest save taken
        self.load_phases: dict[str, float] = {}  # the last DCP load's parts, seconds (see _dcp_load)
        self.load_hash_wait_s: float | None = None  # the last verifying load's wait on its hashes
        self.async_saver: BackgroundSaver | None = None
        self._prepared = False
        self._deferred_from: int | None = None  # when_busy defer: the step whose save waits for the previous one
        self._spare: BackgroundSaver | None = None  # when_busy coalesce: a second saver, for the staged state
        self._pending: tuple[int, Hold, SaveHandle] | None = None  # the staged state waiting to be written
        self._newest_full: int | None = None  # the newest committed full step: what a crash now resumes from
        self._writing: set[int] = set()  # steps of saves in flight (retention never deletes them)
        self._lease: FolderLease | None = None
        self._retention: RetentionWorker | None = None
        self._uploads: UploadWorker | None = None
        self.mirror = None
        self._mirror_steps: set[int] = set()
        self.memory: MemoryTier | None = None
        self._finished = False  # the last step was saved: close() removes the memory snapshots
        self._snapshot_at: int | None = None  # the step of the newest memory snapshot taken
        self._snapshot_info: dict | None = None  # its record, reported once the next step shows its cost
        self._step_clock: float | None = None  # when save() was last called: the loop's step times
        self._plain_steps: list[float] = []  # recent step times of steps no snapshot or save touched
        self.saves_lost: list[dict] = []  # saves whose writer process died (training went on)
        self._new_folder = False  # the folder did not exist at start (rank 0): a new run, not a restart
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
            if config.when_busy == "coalesce":
                self._spare = BackgroundSaver(config.async_mode, writer=config.async_writer,
                                              device_snapshot=config.device_snapshot)
        if self.rank == 0 and config.keep_latest_k > 0 and not config.load_only:
            self._retention = RetentionWorker(self.store, config.keep_latest_k,
                                              protect=lambda: set(self._writing) | self._uploading(),
                                              busy=lambda: bool(self._writing),
                                              held=self._lease.check_held if self._lease is not None else None)
        if self.rank == 0 and self.mirror is not None and not config.load_only:
            self._uploads = UploadWorker(self.store, self.mirror, config.keep_latest_k)
        if config.memory_interval > 0 and not config.load_only:
            try:
                self._open_memory_tier(initialized)
            except CheckpointError:
                self.close()  # the lease and the workers: the caller gets no manager to close
                raise
        self._barrier()

    def _open_memory_tier(self, initialized: bool) -> None:
        # The replicas travel on a gloo group of their own, used only by the snapshots' thread.
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=MEMORY_GROUP_TIMEOUT_S)) \
            if initialized and self.world_size > 1 else None
        identity = run_identity(self.folder, self.model_info, {"seed": self.seed, "config": self.resume_config})
        directory = self.config.memory_dir or default_dir(identity)
        found, problem = None, None
        try:
            directory = open_private_dir(directory)
            if not self.config.memory_dir:
                for removed in remove_other_configs(directory, identity):
                    logger.info("removed %s: the memory snapshots of an earlier run on this folder with another "
                                "model or config", removed)
            found = read_run(directory)
        except CheckpointError as e:
            problem = str(e)
        except OSError as e:
            problem = f"{directory}: {e.strerror or e}"
        run = {**identity, "id": self._memory_run_id(found, identity, problem)}
        try:
            # With async saves, a disk save writes the memory snapshot of its step (one copy of
            # the state to host, not two): a third slot is kept for the save in flight.
            shared = self.async_saver is not None
            self.memory = MemoryTier(directory, rank=self.rank, world_size=self.world_size, layout=self.layout,
                                     run=run, replicas=self.config.memory_replicas, group=group,
                                     slots=3 if shared else 2, device_snapshot=self.config.device_snapshot)
            if shared:
                self.memory.when_released(self.async_saver.forget_arena)
        except CheckpointError as e:
            raise CheckpointError(f"--checkpoint.memory_dir: {e}") from None
        except OSError as e:
            raise CheckpointError(f"Config.memory_dir {directory}: {e.strerror or e}") from e

    def _memory_run_id(self, found: dict | None, identity: dict, problem: str | None) -> str:
        """The memory tier's run id, the same on every rank: a restart (the folder existed at
        start) adopts the one its memory directories hold for this folder, model and config
        (the most common one, where nodes differ); a new run draws one. A rank's ``problem``
        with its directory stops every rank."""
        mine = found["id"] if found and all(found.get(key) == value for key, value in identity.items()) else None
        proposals = [(mine, self._new_folder, new_run_id(), problem)]
        if self.world_size > 1:
            proposal, proposals = proposals[0], [None] * self.world_size
            dist.all_gather_object(proposals, proposal, group=self._gloo_group())
        problems = [proposal[3] for proposal in proposals if proposal[3]]
        if problems:
            raise CheckpointError(f"--checkpoint.memory_dir: {problems[0]}")
        ids = [proposal[0] for proposal in proposals if proposal[0]]
        if proposals[0][1] or not ids:
            return proposals[0][2]
        return min(ids, key=lambda run_id: (-ids.count(run_id), ids.index(run_id)))

    # --- start-up -----------------------------------------------------------------------------

    def _start_on_rank0(self) -> None:
        """Check that a save can be written and committed (an object store's conditional writes
        are probed: one that ignores them is refused here, before anything is written), take the
        folder's lease, which every commit then confirms (the store's fence), and clean up what
        crashed saves left (never what a live run writes)."""
        if not self.config.load_only:
            self._new_folder = not self.store.exists()
            self.store.check_writable()  # first: a read-only folder is one line, not a failed lease write
            if self.mirror is not None:
                self.mirror.check_writable()
            self._lease = FolderLease.acquire(self.store)
            self.store.set_fence(self._lease.confirm)
            self.store.cleanup_incomplete(background=True)  # off the path to the first step

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
        elif self.async_saver is not None:  # with the memory tier, saves write its snapshots' copies
            self.async_saver.prepare(state)
        if self._spare is not None:
            self._spare.prepare(state)

    def _check_memory_room(self, local_bytes: int) -> None:
        """The snapshots need room for their slots on every node: stop before training on if not."""
        problem = self.memory.room_problem(local_bytes)
        problems = [problem]
        if self.world_size > 1:
            problems = [None] * self.world_size
            dist.all_gather_object(problems, problem, group=self._gloo_group())
        found = [p for p in problems if p]
        if found:
            raise CheckpointError(f"Config.memory_dir: {found[0]}; lower Config.memory_replicas, point "
                                  "Config.memory_dir at a larger tmpfs, or set Config.memory_interval 0")

    def _check_room(self, local_bytes: int) -> None:
        """A step needs about the state's bytes (all ranks): refuse to train on if the folder has less."""
        total = torch.tensor([float(local_bytes)])
        if self.world_size > 1:
            dist.all_reduce(total, group=self._gloo_group())
        needed = int(total.item())
        free = getattr(self.store, "free_bytes", lambda: None)() if self.rank == 0 else None

        def check() -> None:
            if free is not None and free < needed:
                raise CheckpointError(f"Config.folder {self.folder} has {free / 1e9:.2f} GB free, but one "
                                      f"checkpoint of this run needs about {needed / 1e9:.2f} GB: free space there "
                                      "or point Config.folder elsewhere (stopped before any step was lost)")

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

    def save(self, step: int, last_step: bool = False, stopping: bool = False) -> SaveResult:
        """Call after every step; saves when the policy says so and returns what it did.

        A full save every ``Config.interval`` steps (and after step 1 with
        ``Config.enable_first_step_checkpoint``). ``last_step``: the run's last step, always saved
        (model only, in ``Config.export_dtype``, unless ``Config.last_save_model_only`` is off) and
        committed before this returns. ``stopping``: the run stops cleanly after this step; a save
        that is due, deferred or staged is taken now and committed. When the previous async save
        is still being written, ``Config.when_busy`` decides (see the module doc). The memory
        tier's snapshot, when one is due, is taken too and reported with the next step as
        ``result.memory`` (its ``stall_s`` is how much longer that step took). A save whose writer
        process died is logged and listed in ``result.lost_saves`` (and ``saves_lost``);
        training goes on.
        """
        if not self.enabled or self.config.load_only:
            return SaveResult(step, "skipped", "the manager is disabled (Config.enable)" if not self.enabled
                              else "Config.load_only is set")
        reported = self._snapshot_cost(self._clock_step())
        lost_before = len(self.saves_lost)
        if self.memory is not None:
            self.memory.record_progress(step)  # first: before the slots are prepared (see record_progress)
        result = self._save_to_store(step, last_step, stopping)
        if self.memory is not None and not last_step:
            self._snapshot(step)
        if reported is not None:
            result = dataclasses.replace(result, memory=reported)
        if len(self.saves_lost) > lost_before:
            result = dataclasses.replace(result, lost_saves=tuple(self.saves_lost[lost_before:]))
        if last_step:
            self._finished = True
        return result

    def _clock_step(self) -> float | None:
        """The loop's time since the previous call of ``save`` (one step, as the loop sees it)."""
        now = time.perf_counter()
        elapsed = None if self._step_clock is None else now - self._step_clock
        self._step_clock = now
        return elapsed

    def _snapshot_cost(self, step_time: float | None) -> dict | None:
        """The record of the snapshot taken at the previous step, its ``stall_s`` how much longer
        the step after it took than the median of recent steps nothing touched; None if none."""
        info, self._snapshot_info = self._snapshot_info, None
        if info is None:
            if step_time is not None and self.memory is not None:
                self._plain_steps = (self._plain_steps + [step_time])[-20:]
            return None
        if step_time is not None and self._plain_steps:
            typical = sorted(self._plain_steps)[len(self._plain_steps) // 2]
            info["stall_s"] = round(max(0.0, step_time - typical), 4)
            info["step_time_s"], info["typical_step_s"] = round(step_time, 4), round(typical, 4)
        return info

    def _snapshot(self, step: int, hold: bool = False):
        """The memory tier's snapshot, every ``memory_interval`` steps, skipped (on every rank)
        while the previous one is still in flight on any rank; with ``hold`` (a disk save of
        this step writes its host copy) taken whatever the interval, after the one in flight."""
        memory = self.memory
        if self._snapshot_at == step:
            return None
        if step % self.config.memory_interval and not hold:
            return None
        busy = (memory.in_flight or not memory.ready) and not hold
        if self.world_size > 1 and not hold:
            flag = torch.tensor([1 if busy else 0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._gloo_group())
            busy = bool(flag.item())
        if busy:
            logger.warning("memory snapshot of step %d skipped: %s", step,
                           "its buffers are still being made" if not memory.ready else
                           f"the previous one is still in flight (a snapshot every "
                           f"{self.config.memory_interval} steps is more often than one takes)")
            self._snapshot_info = {"kind": "memory", "step": step, "skipped": True}
            return None
        previous = dict(memory.last_seconds)
        start = time.perf_counter()
        state = self._full_state_dict()
        staged = memory.snapshot(step, state, hold=hold)
        self._snapshot_at = step
        blocked = round(time.perf_counter() - start, 4)
        info = {"kind": "memory", "step": step, "bytes": state_bytes(state), "blocked_s": blocked,
                "stall_s": blocked, "replicas": memory.replicas}
        if hold:
            info["with_save"] = True
        if previous:
            info["previous_s"] = {k: round(v, 4) for k, v in previous.items()}
        self._snapshot_info = info
        return staged

    def _save_to_store(self, step: int, last_step: bool, stopping: bool) -> SaveResult:
        """The folder's save of this step: due, or waiting (deferred or staged), or neither.

        Whether the previous async save is still being written is agreed by every rank, so
        every rank takes the same branch: a busy saver and a due step go to ``when_busy``; a
        free saver takes a deferred save now, or starts writing a staged one; the last step and
        a stopping one wait for whatever is in flight and save this step.
        """
        self.prepare_async()
        due = self._should_save(step, last_step)
        if not due and self._deferred_from is None and self._pending is None:
            return self._skipped(step)
        running, lost = self._save_status()
        if lost:
            raise CheckpointError(lost)
        final = last_step or stopping
        if running and not final:
            if not due:
                return self._skipped(step)
            if self.config.when_busy == "defer":
                return self._defer(step)
            if self.config.when_busy == "coalesce":
                return self._coalesce(step)
        elif self._pending is not None and not due and not final:
            return self._write_pending(step)
        return self._save_now(step, last_step, final)

    def _save_now(self, step: int, last_step: bool, final: bool) -> SaveResult:
        """Save this step, after the save in flight (waited for); the last or a stopping step's is
        committed before this returns."""
        model_only = last_step and self.config.last_save_model_only
        replaced = self._cancel_pending()  # this step's state is newer than the staged one
        late_by = step - self._deferred_from if self._deferred_from is not None else 0
        self._deferred_from = None
        previous = self.last_save.step if self.last_save is not None else None
        start = time.perf_counter()
        waited = self._finish_in_flight()
        _, lost = self._save_status()  # the folder may have been lost meanwhile (the commit's fence checks again)
        if lost:
            raise CheckpointError(lost)
        if model_only:
            info = self._save_model_only(step, kind=HF if self.config.last_save_in_hf else MODEL_ONLY,
                                         dtype=self.config.export_dtype)
        else:
            info = self._save_full(step)
        stall = time.perf_counter() - start
        if final:
            self._finish_in_flight()
        background = info["async"] and not final
        logger.info("checkpoint step %d: %s save of %.1f MB%s to %s, training stalled %.3f s%s%s", step,
                    info["kind"], info["bytes"] / 1e6, self._per_rank(), self.store.step_url(step), stall,
                    "; writing in the background" if background else "",
                    f"; {info['grouped']} counted" if info.get("grouped") else "")
        if waited >= WAIT_WARNING_S and not final:
            logger.warning("checkpoint step %d: training waited %.2f s for the save of step %s to be committed: a "
                           "save takes longer than Config.interval (%d steps). Raise Config.interval, or set "
                           "Config.when_busy to 'coalesce' or 'defer' to train on meanwhile (a crash may then lose "
                           "more than the interval)", step, waited, previous, self.config.interval)
        reason = ("the last step" if last_step else "stopping after this step" if final
                  else f"deferred since step {step - late_by}; the previous save is committed" if late_by
                  else f"due (every {self.config.interval} steps)" if step % self.config.interval == 0
                  else "the first step (Config.enable_first_step_checkpoint)")
        if waited >= WAIT_WARNING_S and not final:
            reason += f"; waited {waited:.2f} s for the save of step {previous} (Config.when_busy 'wait')"
        return SaveResult(step, "started" if background else "saved", reason, kind=info["kind"],
                          location=self.store.step_url(step), stall_s=round(stall, 4), waited_s=round(waited, 4),
                          late_by=late_by, replaced_step=replaced, steps_at_risk=self.steps_at_risk(step),
                          bytes=info["bytes"], handle=self.last_save, grouped=info.get("grouped"))

    def _skipped(self, step: int) -> SaveResult:
        if self._deferred_from is not None:
            reason = (f"the save due at step {self._deferred_from} is deferred until the previous one is committed "
                      "(Config.when_busy 'defer')")
        elif self._pending is not None:
            reason = (f"the state staged at step {self._pending[0]} is written once the previous save is committed "
                      "(Config.when_busy 'coalesce')")
        else:
            reason = f"not due (every {self.config.interval} steps)"
        return SaveResult(step, "skipped", reason, steps_at_risk=self.steps_at_risk(step))

    def steps_at_risk(self, step: int) -> int:
        """Steps a crash at ``step`` would lose: those since the newest committed full step."""
        return step - (self._newest_full or 0)

    def _risk_note(self, step: int) -> str:
        at_risk = self.steps_at_risk(step)
        beyond = f", more than Config.interval ({self.config.interval})" if at_risk > self.config.interval else ""
        return f"a crash now would lose {at_risk} steps{beyond}"

    def _defer(self, step: int) -> SaveResult:
        """when_busy defer: no save now; the first step after the previous save commits takes one."""
        first = self._deferred_from is None
        if first:
            self._deferred_from = step
        writing = self.last_save.step if self.last_save is not None else None
        reason = (f"the save of step {writing} is still being written; " + (
            "deferred until it is committed" if first else f"still deferred, since step {self._deferred_from}"))
        logger.warning("checkpoint step %d: %s (Config.when_busy 'defer'); %s", step, reason, self._risk_note(step))
        return SaveResult(step, "deferred", reason, kind=FULL, steps_at_risk=self.steps_at_risk(step))

    def _coalesce(self, step: int) -> SaveResult:
        """when_busy coalesce: stage this step's state into the spare saver, held until the save in
        flight commits; a state already staged (and not yet written) is replaced."""
        replaced = self._cancel_pending()
        writing = self.last_save.step if self.last_save is not None else None
        start = time.perf_counter()
        hold = Hold()
        info = self._save_full(step, saver=self._spare, hold=hold)
        self._pending = (step, hold, info["handle"])
        stall = time.perf_counter() - start
        reason = (f"staged while the save of step {writing} is still being written; written as soon as that one is "
                  "committed" + (f", replacing the state staged at step {replaced}" if replaced is not None else ""))
        logger.warning("checkpoint step %d: %s (Config.when_busy 'coalesce'); %s", step, reason, self._risk_note(step))
        return SaveResult(step, "coalesced", reason, kind=FULL, location=self.store.step_url(step),
                          stall_s=round(stall, 4), replaced_step=replaced, steps_at_risk=self.steps_at_risk(step),
                          bytes=info["bytes"], handle=info["handle"])

    def _write_pending(self, step: int) -> SaveResult:
        """The save in flight is committed: start writing the staged state (its saver becomes the writing one)."""
        pending_step, hold, handle = self._pending
        self._pending = None
        self._writing.add(pending_step)
        hold.release()
        self.async_saver, self._spare = self._spare, self.async_saver
        self.last_save = handle
        logger.info("checkpoint step %d: writing the state staged at step %d to %s now that the previous save is "
                    "committed", step, pending_step, self.store.step_url(pending_step))
        return SaveResult(pending_step, "started", f"staged at step {pending_step}; the previous save is committed",
                          kind=FULL, location=self.store.step_url(pending_step), late_by=step - pending_step,
                          steps_at_risk=self.steps_at_risk(step), handle=handle)

    def _cancel_pending(self) -> int | None:
        """Drop the staged state that waits to be written (on every rank alike); returns its step."""
        if self._pending is None:
            return None
        step, hold, _ = self._pending
        self._pending = None
        hold.cancel()
        self._spare.wait()  # its worker finishes the staging and returns without writing
        return step

    def _save_status(self) -> tuple[bool, str | None]:
        """(whether the previous async save is still in flight on any rank, why the folder's lease
        was lost if it was), agreed by all ranks."""
        running = self.async_saver is not None and self.async_saver.in_flight
        if self._lease is not None and self._lease.lost is None:
            with contextlib.suppress(CheckpointError, OSError):  # a read of the store: taken over while
                self._lease.check_held()  # stopped? (a storage hiccup is not a lost lease: the fence asks again)
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

    def _info(self, kind: str, dtype: str, state: dict[str, Any] | None = None) -> dict:
        """The manifest's description of a save; with ``state``, its grouped tensors counted (``groups.py``)."""
        info = {"kind": kind, "dtype": dtype, "layout": self.layout}
        if self.model_info:
            info["model"] = self.model_info
        group_of = getattr(self.sd_adapter, "tensor_group", None)
        grouped = grouped_tensors(flat_tensors(state), group_of) if state is not None and group_of else {}
        if grouped:
            info["grouped"] = grouped
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

    def _save_full(self, step: int, saver: BackgroundSaver | None = None, hold: Hold | None = None) -> dict:
        """A full save of this step: sync, or staged into ``saver`` (default: the async saver) and
        written in the background (with ``hold``: once it is released)."""
        state = self._full_state_dict()
        info = self._info(FULL, "mixed", state)
        nbytes = state_bytes(state)
        saver = saver or self.async_saver
        if hold is None:
            self._writing.add(step)
        if saver is None:
            try:
                self.last_save = save(state, self.store, step, info=info, checksums=self.checksums,
                                      process_group=self.group, thread_count=self.config.write_threads,
                                      on_commit=self._committed)
            finally:
                self._writing.discard(step)
            self._newest_full = step
            self._after_commit(step)
        else:
            started = time.perf_counter()

            def after_commit() -> None:
                logger.info("checkpoint step %d: background write of %.1f MB to %s committed %.2f s after the save "
                            "began", step, nbytes / 1e6, self.store.step_url(step), time.perf_counter() - started)
                self._newest_full = max(step, self._newest_full or 0)
                self._after_commit(step)

            staged_by = None
            if saver is self.async_saver and hold is None:
                if self.memory is not None:  # the snapshot of this step: one copy of the state to host
                    staged_by = self._snapshot(step, hold=True)
                self._collect_previous_save()
            handle = saver.save(state, self.store, step, info=info, checksums=self.checksums,
                                on_commit=self._committed, after_commit=after_commit,
                                thread_count=self.config.write_threads, hold=hold, staged_by=staged_by)
            if hold is None:
                self.last_save = handle
        out = {"kind": FULL, "bytes": nbytes, "async": saver is not None,
               "handle": self.last_save if hold is None else handle}
        if info.get("grouped"):
            out["grouped"] = describe(info["grouped"])
        return out

    def _save_model_only(self, step: int, *, kind: str, dtype: str) -> dict:
        self._finish_in_flight()
        torch_dtype = dtype_named(dtype)
        state = {k: v.to(torch_dtype) if torch.is_floating_point(v) else v
                 for k, v in self.model.state_dict().items()}
        info = self._info(kind, dtype, state if kind != HF else None)
        if kind == HF:
            if self.sd_adapter is None:
                raise CheckpointError("Config.last_save_in_hf needs a state dict adapter (sd_adapter=...) to "
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
        for saver in (self.async_saver, self._spare):
            if saver is not None:
                saver.wait_for_staging()
        if self.memory is not None:
            self.memory.wait_for_staging()

    def _finish_in_flight(self) -> float:
        """Wait for the save in flight (if any); returns the seconds waited."""
        start = time.perf_counter()
        self._collect_previous_save()
        return time.perf_counter() - start

    def _collect_previous_save(self) -> None:
        """Wait for the async save in flight (if any) and raise its error, unless its writer process
        died (a signal, the OOM killer): that save is lost, logged and counted, and the next one
        starts a new writer process."""
        if self.async_saver is None:
            return
        handle = self.last_save
        try:
            self.async_saver.wait()
        except Exception as e:  # noqa: BLE001 - only a dead writer is forgiven
            if not isinstance(find_checkpoint_error(e), WriterDiedError):
                raise
            step = handle.step if handle is not None else None
            self._writing.discard(step)
            self.saves_lost.append({"step": step, "why": first_line(find_checkpoint_error(e))})
            logger.error("checkpoint step %s was not saved: %s. Training goes on; the next save starts a new "
                         "writer process (%d save(s) lost in this run)", step, self.saves_lost[-1]["why"],
                         len(self.saves_lost))

    def close(self) -> None:
        """Finish the save in flight, stop the background workers, give the folder's lease back.
        A run whose last step was saved removes its memory snapshots; any other keeps them. A
        state staged by ``when_busy="coalesce"`` and not yet being written is dropped (a
        ``stopping`` or last step's save takes it first)."""
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
        savers = [saver for saver in (self.async_saver, self._spare) if saver is not None]
        self.async_saver = self._spare = None
        try:
            with contextlib.ExitStack() as stack:
                for saver in savers:
                    stack.callback(saver.close)
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
            cleanup = getattr(getattr(self, "store", None), "cleanup_thread", None)
            if cleanup is not None:
                cleanup.join()  # the start's leftovers are gone before the lease is
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

    def load(self, step: int | None = None) -> LoadResult:
        """Restore the newest committed step (or ``step``, or ``Config.load_step``); returns what was
        loaded: a ``LoadResult`` (``step``, ``tier``, ``source``, ``kind``, ``steps_lost``), false
        when nothing was (a fresh start). Precedence: see the module doc."""
        if not self.enabled or not self._load(step):
            return NOTHING_LOADED
        record = dict(self.last_load)
        result = LoadResult(step=record.pop("from_step", None), tier=record.pop("tier"), source=record.pop("path", None),
                            kind=record.pop("kind", None), steps_lost=record.pop("steps_lost", None),
                            seconds=record.pop("seconds", 0.0), bytes=record.pop("bytes", 0),
                            explicit=record.pop("explicit", False), details=record)
        if result.kind == FULL:  # a crash from now on resumes from the folder's newest full step
            self._newest_full = record.get("disk_step") if result.tier in ("memory", "replica") else result.step
        return result

    def resume_expected(self) -> bool:
        """Whether ``load()`` will find something to load (a committed step, a memory snapshot of
        this run's, an initial checkpoint or HF weights): a loop may then leave the model's
        weights uninitialized until ``load()`` has said (a restore overwrites them all)."""
        if not self.enabled:
            return False
        if self.config.initial_load_path or self.config.initial_load_in_hf or self._committed_anywhere():
            return True
        if self.memory is None:
            return False
        inventory = self.memory.inventory()
        return bool(inventory["own"] or inventory["held"])

    def _load(self, step: int | None = None) -> bool:
        config = self.config
        steps = self._committed_anywhere()
        wanted = step if step is not None else (config.load_step if config.load_step != -1 else None)
        if wanted is not None:
            if wanted not in steps:
                places = self.folder + (f" and {self.mirror.url}" if self.mirror is not None else "")
                where = (f"Config.folder {self.folder} does not exist" if not steps and not self.store.exists()
                         else f"committed steps in {places}: {steps or 'none'}")
                asked = f"load(step={wanted})" if step is not None else f"Config.load_step={wanted}"
                raise CheckpointError(f"{asked} not found: {where}")
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
        """Auto-resume. A corrupt newest step stops the job unless Config.fallback_on_corrupt."""
        candidates = list(reversed(steps))
        newest_kind = self._kind_if_readable(candidates[0])
        if newest_kind in (MODEL_ONLY, HF) and (self.total_steps is None or candidates[0] < self.total_steps):
            full_steps = [s for s in candidates if self._kind_if_readable(s) == FULL]
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
                    logger.error("step-%d is corrupt (%s); falling back to step-%d", step,
                                 "; ".join(getattr(e, "problems", None) or [" ".join(str(e).split())]), older)
                    continue
                hint = (f"; to resume from the previous step set Config.load_step={older} "
                        "(or Config.fallback_on_corrupt)" if older is not None else "")
                raise CorruptCheckpointError(f"{e}{hint}", getattr(e, "problems", [])) from e
        return False

    def _restore_from_memory(self, steps: list[int]) -> bool:
        """Resume from the memory tier when it holds a step at least as new as the folder's newest."""
        if self.config.exclude_from_loading:
            logger.info("Config.exclude_from_loading is set: resuming from the folder, not from memory")
            return False
        disk = steps[-1] if steps else None
        restored = restore(self.memory, disk, self._full_state_dict, self._apply_full,
                           group=self._gloo_group() if self.world_size > 1 else None,
                           state_problems=self._steps_problems)
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

    def _steps_problems(self, state: dict[str, Any], step: int) -> list[str]:
        """Why the states' values in ``state`` (a memory snapshot's) are not those of step ``step``:
        a state that can tell how many steps its values have seen (a ``steps_done(state_dict)``
        method, e.g. the train state's step, the data loader's position) must say ``step``."""
        problems = []
        for key, stateful in self.states.items():
            steps_done = getattr(stateful, "steps_done", None)
            if not callable(steps_done):
                continue
            try:
                said = steps_done(state[key])
            except (KeyError, TypeError, ValueError) as e:
                problems.append(f"its {key} does not say its step ({e})")
                continue
            if said is not None and said != step:
                problems.append(f"it claims step {step}, its {key} is at step {said}")
        return problems

    def _apply_full(self, state: dict[str, Any]) -> None:
        """Hand a full state dict (model FQNs and one entry per state) to the model and the states."""
        self.model.load_state_dict({k: v for k, v in state.items() if k not in self.states})
        for key, stateful in self.states.items():
            stateful.load_state_dict(state[key])

    def _committed_anywhere(self) -> list[int]:
        """Committed steps of the folder and, with Config.upload_to, of the mirror."""
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

    def _kind_if_readable(self, step: int) -> str | None:
        """The step's kind; None when its manifest is damaged (loading it then says so, or falls back)."""
        try:
            return self._kind(step)
        except CorruptCheckpointError:
            return None

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
            nbytes = self._dcp_load(store, step, include_states=(), manifest=manifest)
        else:
            keys = [k for k in self.states if k not in self.config.exclude_from_loading]
            saved_layout = manifest.get("layout")
            if saved_layout is not None and saved_layout != self.layout:
                for key in [k for k in keys if isinstance(self.states[k], PerRankState)]:
                    logger.warning("step-%d was saved with layout %s, this run is %s: %s is re-seeded per rank "
                                   "instead of restored", step, saved_layout, self.layout, key)
                    keys.remove(key)
                    self.states[key].reseed(self.seed if self.seed is not None else 0)
            nbytes = self._dcp_load(store, step, include_states=keys, manifest=manifest)
        seconds = time.perf_counter() - start
        logger.info("loaded %s checkpoint %s: %.1f MB%s in %.2f s", kind, location, nbytes / 1e6, self._per_rank(),
                    seconds)
        self.last_load = {"kind": kind, "from_step": step, "path": location, "bytes": nbytes,
                          "seconds": round(seconds, 4), "tier": _tier(store), "explicit": explicit}
        if kind != HF:
            self.last_load["phases"] = self.load_phases
        return True

    def _load_initial(self, path: str) -> bool:
        store, step = open_step(path, "Config.initial_load_path")
        states = () if self.config.initial_load_model_only else [
            k for k in self.states if k not in self.config.exclude_from_loading]
        start = time.perf_counter()
        nbytes = self._dcp_load(store, step, include_states=states)
        seconds = time.perf_counter() - start
        logger.info("loaded initial checkpoint %s (%s): %.1f MB%s in %.2f s", path,
                    "model only" if not states else "model, " + ", ".join(states), nbytes / 1e6, self._per_rank(),
                    seconds)
        self.last_load = {"kind": "initial", "path": str(path), "bytes": nbytes, "seconds": round(seconds, 4),
                          "tier": _tier(store)}
        return True

    def _load_hf(self, path: str) -> bool:
        flag = "Config.initial_load_path" if self.config.initial_load_path else "hf_assets_path"
        start = time.perf_counter()
        with local_folder(path, flag) as local:
            if not local.is_dir():
                raise CheckpointError(f"{flag} {path}: not a Hugging Face folder (no such directory)")
            nbytes = self._read_hf(local)
        seconds = time.perf_counter() - start
        logger.info("loaded Hugging Face weights from %s: %.1f MB in %.2f s", path, nbytes / 1e6, seconds)
        self.last_load = {"kind": "hf", "path": str(path), "bytes": nbytes, "seconds": round(seconds, 4),
                          "tier": "object" if is_object_uri(path) else "disk"}
        return True

    def _read_hf(self, path: Path) -> int:
        """Model weights from a local HF directory; returns the bytes this rank read."""
        if self.sd_adapter is None:
            raise CheckpointError(f"loading Hugging Face weights from {path} needs a state dict adapter "
                                  "(sd_adapter=...)")
        state = self.model.state_dict()
        result = load_hf(state, path, self.sd_adapter)
        self.model.load_state_dict(state)
        if result["dropped"] and self.rank == 0:
            logger.warning("%s has no place for %s: they start at zero", path,
                           ", ".join(result["dropped"]))
        return result["bytes"]

    def _dcp_load(self, store, step, include_states, manifest: dict | None = None) -> int:
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
        self._check_against_metadata(where, store.reader(step), state, manifest)
        lap("check")
        # store.load re-raises a corrupt file as CorruptCheckpointError on every rank.
        single = self.world_size == 1 and not dist.is_initialized()
        with single_process_dcp() if single else contextlib.nullcontext():
            reader = store.load(state, step, verify=self.config.verify, process_group=self.group, no_dist=single)
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

    def _check_against_metadata(self, where: str, reader, state: dict, manifest: dict | None = None) -> None:
        """Name every key a load cannot fill whole (missing, another shape, a chunk never stored)
        before DCP reads a byte, and count the grouped tensors (experts) it fills."""
        metadata = reader.read_metadata()
        _, missing = mismatches(metadata, {}, [key for key in state if key in self.states])
        problems = [f"{key!r} is not in the checkpoint (saved model-only?); add it to Config.exclude_from_loading to "
                    "skip it" for key in missing]
        flat = flat_tensors({key: value for key, value in state.items() if key not in missing})
        problems += load_problems(flat, metadata, manifest, self.states)
        if problems:
            described = ", ".join(f"{key} {value}" for key, value in self.model_info.items())
            raise mismatch_error(where, f"this model ({described})" if described else "this model", problems)
        group_of = getattr(self.sd_adapter, "tensor_group", None)
        grouped = grouped_tensors(flat, group_of) if group_of else {}
        if grouped and self.rank == 0:
            logger.info("%s: every one of %s is in the checkpoint, whole", where, describe(grouped))


def _tier(store) -> str:
    """The LoadResult tier of a store: a local or shared folder, or object storage."""
    return "disk" if store.scheme == "file" else "object"
