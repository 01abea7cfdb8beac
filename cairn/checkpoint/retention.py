"""Retention off the save path: old steps are deleted by a low-priority thread of their own.

A save never waits for a delete, and a training step never does either: after a commit the
manager asks the worker for a pass (``request``), which returns at once. The worker deletes
one step at a time (never two at once), each first made invisible in one atomic step by the
store, then removed paced (``local.Pacer``): large files are shrunk a chunk at a time, with
longer pauses while a save is being written, so the deletes do not starve the writer on the
same disk. Its thread runs at the lowest CPU and I/O priority Linux offers a thread.

It never removes the newest committed step (the store keeps the newest ``keep_latest_k``,
and ``keep_latest_k >= 1``) nor a step being written (``protect``). When deleting takes longer
than the time between saves, the disk cannot keep up: that is logged with the figures.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import threading
import time
from collections.abc import Callable

from cairn.checkpoint.local import Pacer

logger = logging.getLogger("cairn")

_IOPRIO_SET = {"x86_64": 251, "aarch64": 30}  # syscall numbers of ioprio_set
_IOPRIO_CLASS_IDLE, _IOPRIO_CLASS_SHIFT, _IOPRIO_WHO_PROCESS = 3, 13, 1


def lower_this_threads_priority() -> None:
    """Nice 19 and the idle I/O class for the calling thread (Linux; elsewhere nothing)."""
    tid = threading.get_native_id()
    with contextlib.suppress(OSError, AttributeError, PermissionError):
        os.setpriority(os.PRIO_PROCESS, tid, 19)  # per thread on Linux
    number = _IOPRIO_SET.get(platform.machine())
    if number is not None and platform.system() == "Linux":
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall(number, _IOPRIO_WHO_PROCESS, tid, _IOPRIO_CLASS_IDLE << _IOPRIO_CLASS_SHIFT)


class RetentionWorker:
    """Keeps the newest ``keep_latest_k`` committed steps of ``store``, deleting older ones in the background.

    ``protect()`` returns the steps being written (never deleted); ``busy()`` whether a save is
    writing now (deletes pause longer between chunks meanwhile).
    """

    def __init__(self, store, keep_latest_k: int, *, protect: Callable[[], set[int]] = set,
                 busy: Callable[[], bool] | None = None, pacer: Pacer | None = None,
                 held: Callable[[], None] | None = None):
        if keep_latest_k < 1:
            raise ValueError(f"Config.keep_latest_k must be >= 1 for a retention worker (got {keep_latest_k})")
        self.store = store
        self.held = held  # raises if this run no longer holds the folder's lease (FolderLease.check_held)
        self.keep_latest_k = keep_latest_k
        self._protect = protect
        self.pacer = pacer or Pacer(busy=busy)
        self._wake = threading.Condition()
        self._pending = False
        self._closing = False
        self._idle = threading.Event()
        self._idle.set()
        self.deleted: list[int] = []
        self.delete_seconds: list[float] = []
        self.requests = 0
        self._last_request: float | None = None
        self._interval_s: float | None = None  # time between the last two requests (saves)
        self._thread = threading.Thread(target=self._run, name="cairn-retention", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """Ask for a pass after a commit; returns at once (passes asked for meanwhile coalesce)."""
        now = time.perf_counter()
        if self._last_request is not None:
            self._interval_s = now - self._last_request
        self._last_request = now
        with self._wake:
            self.requests += 1
            self._pending = True
            self._idle.clear()
            self._wake.notify()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Until no pass is pending or running (tests, and ``close``)."""
        return self._idle.wait(timeout)

    def close(self, wait: bool = True) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        if wait:
            self._thread.join()

    def _run(self) -> None:
        lower_this_threads_priority()
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._pending or self._closing)
                if not self._pending:
                    return
                self._pending = False
            try:
                self._pass()
            except Exception as e:  # noqa: BLE001 - retention must never take training down
                logger.warning("checkpoint retention failed (%s: %s); older steps are kept for now",
                               type(e).__name__, e)
            finally:
                with self._wake:
                    if not self._pending:
                        self._idle.set()

    def _pass(self) -> None:
        if self.held is not None:
            self.held()  # a run that lost the folder's lease deletes nothing there
        steps = self.store.committed_steps()
        keep = set(steps[-self.keep_latest_k:]) | set(self._protect())
        for step in steps:
            if step in keep:
                continue
            start = time.perf_counter()
            try:
                gigabytes = int((self.store.read_manifest(step) or {}).get("total_bytes") or 0) / 1e9
            except Exception:  # noqa: BLE001 - a damaged manifest: the step goes all the same
                gigabytes = 0.0
            if not self.store.delete(step, self.pacer):
                continue
            seconds = time.perf_counter() - start
            self.deleted.append(step)
            self.delete_seconds.append(seconds)
            logger.info("retention: deleted checkpoint step %d (%.2f GB) in %.2f s (keeping the newest %d)", step,
                        gigabytes, seconds, self.keep_latest_k)
            interval = self._interval_s
            if interval is not None and seconds > interval:
                logger.warning("retention: deleting step %d (%.2f GB) took %.1f s, longer than the %.1f s between "
                               "saves: this disk cannot delete old steps as fast as they are written. Steps pile "
                               "up until it catches up (training is not slowed); raise Config.interval or "
                               "Config.keep_latest_k", step, gigabytes, seconds, interval)
        cleanup = getattr(self.store, "remove_trash", None)
        if cleanup is not None:
            cleanup(self.pacer)
