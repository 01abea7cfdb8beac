"""Async saves: copy the state to host memory, then write it in the background.

Two modes, as torchtitan names them:
- ``async``: fresh host copies for every save (memory is returned between saves);
- ``async_with_pinned_mem``: host buffers (pinned on CUDA hosts) allocated at the first
  save and reused by every later one, so no save after the first allocates or pins memory.

Staging runs on the save's worker thread on every device and overlaps the next step's
forward/backward; the trainer waits for it only before the optimizer step, the first moment
the parameters change. The training thread only takes the state dict and, on GPU hosts,
records an event on its stream; the worker's copies go on a side CUDA stream that waits for
that event, so they see the parameters as that step left them. Nothing the size of the
state runs on the training thread: not the copy into pageable memory of ``async`` mode
(which blocks the thread that issues it), not the first save's pinned allocation, not the
per-tensor launches. ``copy_`` releases the GIL. At most one save is in flight.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch.distributed.tensor import DTensor

logger = logging.getLogger("cairn")


def _leaves(obj: Any, prefix: str = ""):
    """(path, tensor) for every tensor in a nested dict/list state dict, in a fixed order."""
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from _leaves(obj[key], f"{prefix}{key}/")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _leaves(value, f"{prefix}{i}/")
    elif isinstance(obj, torch.Tensor):
        yield prefix, obj


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class HostStager:
    """Copies a state dict's tensors into host buffers; keeps the buffers when ``reuse``."""

    def __init__(self, *, reuse: bool, pin_memory: bool):
        self.reuse = reuse
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self._buffers: dict[str, torch.Tensor] = {}
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.allocated_bytes = 0
        self.allocations = 0

    def _buffer(self, path: str, local: torch.Tensor) -> torch.Tensor:
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != local.shape or buffer.dtype != local.dtype:
            buffer = torch.empty(local.shape, dtype=local.dtype, device="cpu", pin_memory=self.pin_memory)
            self.allocated_bytes += buffer.numel() * buffer.element_size()
            self.allocations += 1
            if self.reuse:
                self._buffers[path] = buffer
        return buffer

    def ready_marker(self) -> torch.cuda.Event | None:
        """On GPU hosts, an event on the training stream now: the copies start after it."""
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def stage(self, state_dict: dict, ready: torch.cuda.Event | None = None) -> dict:
        """A host copy of ``state_dict`` (same structure); returns once every copy has landed.

        ``ready`` (from ``ready_marker``, taken on the training thread) orders the copies
        after the work that produced the state when ``stage`` runs on another thread.
        """
        if self._stream is None:
            return self._copy(state_dict)
        # The device, not only the stream: a new thread's current device is 0, and pinned
        # allocations or events made there would open a context on another rank's GPU.
        with torch.cuda.device(self._stream.device), torch.cuda.stream(self._stream):
            if ready is not None:
                self._stream.wait_event(ready)
            else:
                self._stream.wait_stream(torch.cuda.default_stream(self._stream.device))
            staged = self._copy(state_dict)
            done = torch.cuda.Event()
            done.record(self._stream)
        done.synchronize()
        return staged

    def _copy(self, state_dict: dict) -> dict:
        copies: dict[int, torch.Tensor] = {}
        for path, tensor in _leaves(state_dict):
            local = _local(tensor)
            buffer = self._buffer(path, local)
            buffer.copy_(local.detach(), non_blocking=local.is_cuda)
            copies[id(tensor)] = buffer
        return _rebuild(state_dict, copies)


def _rebuild(obj: Any, copies: dict[int, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        return {key: _rebuild(value, copies) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_rebuild(value, copies) for value in obj]
    if isinstance(obj, tuple):
        return tuple(_rebuild(value, copies) for value in obj)
    if isinstance(obj, DTensor):
        return DTensor.from_local(copies[id(obj)], obj.device_mesh, obj.placements, run_check=False,
                                  shape=obj.shape, stride=obj.stride())
    if isinstance(obj, torch.Tensor):
        return copies[id(obj)]
    return obj


# While a background write runs, the training thread may wait up to Python's GIL switch
# interval (5 ms) each time it wants the GIL back from the writer (after every CUDA sync it
# made without the GIL). A shorter interval hands it back sooner; the writer spends most of
# its time in system calls without the GIL and loses little. Seconds; 0 leaves Python's own.
SWITCH_INTERVAL_ENV = "CAIRN_WRITER_SWITCH_INTERVAL"
DEFAULT_SWITCH_INTERVAL = 0.0005


def _writer_switch_interval() -> float:
    raw = os.environ.get(SWITCH_INTERVAL_ENV)
    try:
        return DEFAULT_SWITCH_INTERVAL if raw is None else float(raw)
    except ValueError:
        raise ValueError(f"{SWITCH_INTERVAL_ENV}={raw!r}: expected seconds, e.g. 0.0005 (0: Python's default)") \
            from None


class AsyncSaver:
    """One background worker: stage into host memory, then write and commit."""

    def __init__(self, *, reuse_buffers: bool):
        self.stager = HostStager(reuse=reuse_buffers, pin_memory=reuse_buffers)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cairn-ckpt")
        self._staged = threading.Event()
        self._staged.set()
        self._future: Future | None = None
        self.last_stage_seconds = 0.0

    def submit(self, step: int, state_dict: dict, write: Callable[[dict], Any]) -> None:
        self.wait()  # at most one save in flight
        self._staged.clear()
        start = time.perf_counter()
        ready = self.stager.ready_marker()

        interval = _writer_switch_interval()

        def job():
            try:
                staged = self.stager.stage(state_dict, ready)
            finally:
                self.last_stage_seconds = time.perf_counter() - start
                self._staged.set()
            before = sys.getswitchinterval()
            if 0 < interval < before:
                sys.setswitchinterval(interval)
            try:
                return write(staged)
            finally:
                sys.setswitchinterval(before)

        self._future = self._executor.submit(job)

    def wait_for_staging(self) -> None:
        self._staged.wait()

    def wait(self) -> Any:
        """Block until the in-flight save (if any) is written and committed; re-raise its error."""
        future, self._future = self._future, None
        if future is None:
            return None
        return future.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)
