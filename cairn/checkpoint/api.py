"""Checkpointing from any training loop, without a manager: save, load, list, verify.

    from cairn.checkpoint import BackgroundSaver, load, save, latest_step

    state = {"model": ModelState(model), "optimizer": OptimizerState(model, optim)}
    saver = BackgroundSaver("async_with_pinned_mem")      # keeps reused staging buffers
    for step in range(start, steps):
        ...                                               # forward, backward
        saver.wait_for_staging()                          # before the state changes
        optim.step()
        if step % 100 == 0:
            save(state, "ckpt", step, async_saver=saver)  # returns once staged
    saver.close()
    load(state, "ckpt")                                   # the newest committed step, verified

Every call is collective when a process group is initialized (call it on every rank);
``location`` is a local folder, an ``s3://bucket/prefix`` URI or a store (``open_store``).
A step is committed (visible to ``list_steps``/``load``) only once every rank's files and
its manifest are complete, and a load checks every file against the manifest's checksums
(``verify=False`` checks sizes only).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from concurrent.futures import Future
from typing import Any, Callable, Mapping

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

from cairn.checkpoint.errors import CheckpointError, reraise_user_error
from cairn.checkpoint.planner import BytesMemo, CairnSavePlanner
from cairn.checkpoint.staging import AsyncSaver, StagedElsewhere
from cairn.checkpoint.store import CheckpointStore, open_store

logger = logging.getLogger("cairn")

ASYNC_MODES = ("async", "async_with_pinned_mem")


def as_store(location: str | os.PathLike | CheckpointStore) -> CheckpointStore:
    """A store for a path, a URI, or the store itself."""
    if isinstance(location, (str, os.PathLike)):
        return open_store(location)
    return location


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _plain(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """The state dict with each ``Stateful`` value replaced by its ``state_dict()`` (as DCP does)."""
    return {key: value.state_dict() if isinstance(value, Stateful) else value for key, value in state_dict.items()}


@dataclasses.dataclass
class SaveHandle:
    """One save: where it goes, how long the caller was held, and (async) its completion.

    ``result()`` waits until the step is committed and returns where it lives, raising the
    save's error (one clear CheckpointError) if it failed."""

    step: int
    location: str
    blocked_s: float
    writer: Any
    future: Future | None = None
    timeline: dict[str, float] = dataclasses.field(default_factory=dict)

    def done(self) -> bool:
        return self.future is None or self.future.done()

    def result(self, timeout: float | None = None) -> str:
        if self.future is not None:
            try:
                self.future.result(timeout)
            except Exception:
                self.future.cairn_reported = True  # raised here: closing the saver does not raise it again
                raise
        return self.location

    @property
    def committed_at(self) -> float | None:
        """``time.perf_counter()`` when the coordinator committed the step (None elsewhere, or not yet)."""
        return self.writer.committed_at

    @property
    def hash_wait_s(self) -> float | None:
        """Seconds this rank's writer waited on checksums beyond its writes (None: written in the writer process)."""
        return self.writer.hash_wait_s


def save(state_dict: Mapping[str, Any], location: str | os.PathLike | CheckpointStore, step: int, *,
         async_saver: BackgroundSaver | None = None, info: Mapping[str, Any] | None = None, checksums: bool = True,
         process_group: dist.ProcessGroup | None = None, thread_count: int = 1,
         on_commit: Callable[[int, str], None] | None = None) -> SaveHandle:
    """Save ``state_dict`` (tensors, DTensors, plain values, ``Stateful`` objects) as step ``step``.

    Synchronous unless ``async_saver`` is given: then it returns once the state is staged
    into the saver's host buffers and the files are written and committed in the background
    (``handle.result()`` waits for that). ``info`` (JSON-able) goes into the manifest;
    ``on_commit(step, location)`` runs on the coordinator once the step is committed."""
    store = as_store(location)
    if async_saver is not None:
        return async_saver.save(state_dict, store, step, info=info, checksums=checksums, on_commit=on_commit)
    start = time.perf_counter()
    writer = store.writer(step, info, checksums=checksums, thread_count=thread_count, process_group=process_group)
    writer.on_commit = on_commit
    try:
        dcp.save(_plain(state_dict), storage_writer=writer, process_group=process_group, no_dist=not _distributed())
    except BaseException as e:
        reraise_user_error(e, writer)
    return SaveHandle(step, store.step_url(step), time.perf_counter() - start, writer)


def list_steps(location: str | os.PathLike | CheckpointStore) -> list[int]:
    """The committed steps at ``location``, ascending ([] for a folder that does not exist yet)."""
    return as_store(location).committed_steps()


def latest_step(location: str | os.PathLike | CheckpointStore) -> int | None:
    """The newest committed step at ``location``, or None."""
    steps = list_steps(location)
    return steps[-1] if steps else None


def load(state_dict: dict[str, Any], location: str | os.PathLike | CheckpointStore, step: int | None = None, *,
         verify: bool = True, process_group: dist.ProcessGroup | None = None, planner=None) -> int:
    """Load step ``step`` (None: the newest committed) into ``state_dict`` in place; returns the step.

    Tensors are filled in place (resharded to their current layout), ``Stateful`` values get
    ``load_state_dict``. ``verify`` checks every file's checksum while it is read. Nothing
    from the checkpoint runs code. CheckpointError names the step and place if there is none."""
    store = as_store(location)
    steps = store.committed_steps()
    if step is None:
        if not steps:
            raise CheckpointError(f"no committed checkpoint in {store.url}")
        step = steps[-1]
    elif step not in steps:
        raise CheckpointError(f"step {step} is not a committed checkpoint in {store.url}: committed steps "
                              f"{steps or 'none'}")
    store.load(state_dict, step, verify=verify, planner=planner, process_group=process_group,
               no_dist=not _distributed())
    return step


def verify(location: str | os.PathLike | CheckpointStore, step: int | None = None) -> list[str]:
    """Every problem of step ``step`` (None: every committed step) against its manifest; [] if sound."""
    store = as_store(location)
    steps = store.committed_steps() if step is None else [step]
    return [problem for s in steps for problem in store.verify(s)]


class BackgroundSaver:
    """Async saves for a loop without a manager: the state is staged into host buffers made once
    and reused (pinned on CUDA hosts for ``async_with_pinned_mem``; pageable and touched once for
    ``async``), then written by a child process and committed on a thread, while training goes on.

    Call ``wait_for_staging()`` before the state changes (before ``optimizer.step()``): it waits
    only until the copies are queued. At most one save is in flight: ``save`` waits for the
    previous one (``in_flight`` says whether it would). Collective like ``save``.
    """

    def __init__(self, mode: str = "async_with_pinned_mem", *, writer: str = "process",
                 device_snapshot: str = "auto", process_group: dist.ProcessGroup | None = None):
        if mode not in ASYNC_MODES:
            raise ValueError(f"BackgroundSaver mode must be one of {', '.join(ASYNC_MODES)} (got {mode!r})")
        self.mode = mode
        # Background saves run their collectives on a group of their own, so they never
        # interleave with the training step's collectives on the default group.
        if process_group is None and _distributed():
            process_group = dist.new_group(backend="gloo")
        self.group = process_group
        self.saver = AsyncSaver(reuse_buffers=True, pin_memory=mode == "async_with_pinned_mem", writer=writer,
                                device_snapshot=device_snapshot)
        self._memo = BytesMemo()  # used by the save worker thread only

    @property
    def in_flight(self) -> bool:
        return self.saver.in_flight

    def prepare(self, state_dict: Mapping[str, Any]) -> None:
        """Allocate the reused buffers for this state's layout in the background (after the first
        step, when the optimizer state exists), so the first save does not."""
        self.saver.prepare(_plain(state_dict))

    def save(self, state_dict: Mapping[str, Any], location: str | os.PathLike | CheckpointStore, step: int, *,
             info: Mapping[str, Any] | None = None, checksums: bool = True,
             on_commit: Callable[[int, str], None] | None = None,
             after_commit: Callable[[], None] | None = None, thread_count: int = 1,
             staged_by: StagedElsewhere | None = None) -> SaveHandle:
        """Stage ``state_dict`` and write it as step ``step`` in the background; ``after_commit``
        runs on the worker once the step is committed (and before the next save may start).
        ``staged_by``: write from a host copy another stager makes of this state (the memory
        tier's snapshot of the step) instead of staging it again."""
        store = as_store(location)
        start = time.perf_counter()
        plain = _plain(state_dict)
        self.saver.wait()  # the previous save's collectives are done before this writer agrees on anything
        writer = store.writer(step, info, checksums=checksums, thread_count=thread_count, process_group=self.group)
        writer.on_commit = on_commit
        if self.saver.writer_process is not None:
            writer.delegate = self.saver.write_data
        group = self.group
        single = group is None and not _distributed()
        memo = self._memo

        def write(staged: dict) -> str:
            try:
                dcp.save(staged, storage_writer=writer, process_group=group, no_dist=single,
                         planner=CairnSavePlanner(memo))
            except BaseException as e:
                reraise_user_error(e, writer)
            if after_commit is not None:
                after_commit()
            return store.step_url(step)

        future = self.saver.submit(step, plain, write, staged_by=staged_by)
        return SaveHandle(step, store.step_url(step), time.perf_counter() - start, writer, future,
                          self.saver.timeline)

    def wait_for_staging(self) -> None:
        """Before the state changes: wait until the copies are queued (GPU: order the stream after them)."""
        self.saver.wait_for_staging()

    def forget_arena(self, arena) -> None:
        """An arena another stager handed to ``save(staged_by=...)`` is going away: unmap it in the writer."""
        if self.saver.writer_process is not None:
            self.saver.writer_process.release(arena.id)

    def wait(self) -> None:
        """Until the save in flight (if any) is committed; raises its error."""
        self.saver.wait()

    def close(self) -> None:
        self.saver.close()
