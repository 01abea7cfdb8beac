"""Async saves: copy the state to host memory, then write it in the background.

Two modes, as torchtitan names them, both with host buffers allocated once (in the background,
after the first training step) and reused by every save, so no save allocates memory:
- ``async_with_pinned_mem``: the buffers are pinned on CUDA hosts (the fastest copies);
- ``async``: pageable buffers, touched once when they are made so that no save faults their
  pages in while it stages (torchtitan allocates fresh copies at every save, which on a
  large model stalls the step that stages it for seconds).

Host buffers live in one block per save layout (``HostArena``: a Linux memfd, pinned with
``cudaHostRegister`` on CUDA hosts), with one tensor per state entry whose storage is
exactly its bytes. The block can be mapped by another process: by default the files are
written by a child process (``writer_process``), so serializing, hashing and writing never
hold the training process's GIL; ``--checkpoint.async_writer thread`` writes from a thread.

Staging runs on the save's worker thread and overlaps the next step's forward/backward.
The training thread only takes the state dict and, on GPU hosts, records an event on its
stream; the worker's copies go on a side CUDA stream that waits for that event. Before the
optimizer step (the first moment the state changes) the training thread waits until the
copies are queued (milliseconds) and then makes its stream wait for them on the GPU, so the
CPU keeps dispatching. With a device snapshot (``--checkpoint.device_snapshot on``, or
``auto``, the default, where the device has the memory to spare) the state is first copied
into device buffers (HBM to HBM, milliseconds) and the optimizer waits only for that; the
copy to host then runs from the snapshot while training goes on, at the price of device
memory equal to the rank's checkpoint shard. On CPU hosts the copies finish before the
optimizer step.
At most one save is in flight.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import functools
import itertools
import logging
import mmap
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import torch
from torch.distributed.checkpoint.planner import WriteItemType
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.tensor import DTensor

from cairn.checkpoint import writer_process
from cairn.checkpoint.errors import WriterDiedError
from cairn.checkpoint.fsio import open_own_file
from cairn.checkpoint.state import local_tensor, nbytes, tensor_leaves
from cairn.checkpoint.writer import zip_crc32_off
from cairn.config.job_config import ASYNC_WRITERS

logger = logging.getLogger("cairn")

_ALIGN = 4096  # each tensor starts on a page of its own in the arena
# Bytes per copy between device and host arenas, one piece in flight at a time. Larger pieces,
# or several queued, hold a training loop's own small device-to-host copies (a loss's .item())
# behind them for the whole transfer: on 1x H200, 64 MiB pieces two deep stalled such a loop for
# all 0.29 s of a 16 GB copy, 8 MiB pieces one at a time not at all, at 47 GB/s instead of 55
# (benchmarks/results/h200x1_recovery_probe.json).
PIECE = 8 << 20
REGISTER_PIECE = 64 << 20  # bytes per cudaHostRegister call (a multiple of PIECE)
PIN_PACE_S = 0.005  # pause between two registered (or faulted-in) pieces while training runs
# A drain into pageable memory (``async`` mode): pinned pieces it cycles through, and threads
# copying them on into the arena. One copier: six, which keep up with the device, slowed every
# training step on 1x H200 by their memory traffic (benchmarks/RESULTS.md, session 10).
RING = 3
COPIERS = 1


@functools.lru_cache(maxsize=None)
def _cudart():
    """The CUDA runtime torch loaded, called through ctypes, which lets go of the GIL for the
    length of each call (torch's bindings hold it while they dispatch): pinning gigabytes, and
    the thousands of piece-sized copies of a drain, run beside the training thread's Python.
    None where no shared libcudart is loaded."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libcudart.so" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            calls = (lib.cudaHostRegister, lib.cudaHostUnregister, lib.cudaMemcpyAsync, lib.cudaStreamSynchronize)
        except (OSError, AttributeError):
            continue
        pointer = ctypes.c_void_p
        for call, args in zip(calls, ([pointer, ctypes.c_size_t, ctypes.c_uint], [pointer],
                                      [pointer, pointer, ctypes.c_size_t, ctypes.c_int, pointer], [pointer])):
            call.argtypes, call.restype = args, ctypes.c_int
        return lib
    return None


def _host_register(ptr: int, nbytes: int) -> int:
    # Portable: page-locked for every CUDA context, as DCP registers its shared buffers.
    lib = _cudart()
    return lib.cudaHostRegister(ptr, nbytes, 1) if lib else int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 1))


def _host_unregister(ptr: int) -> None:
    lib = _cudart()
    if lib:
        lib.cudaHostUnregister(ptr)
    else:
        torch.cuda.cudart().cudaHostUnregister(ptr)


_MEMCPY_DEFAULT = 4  # cudaMemcpyDefault: the direction from the pointers (unified addressing)


def _copy_now(target: torch.Tensor, source: torch.Tensor, stream: torch.cuda.Stream | None) -> None:
    """Copy ``source``'s bytes into ``target`` on ``stream`` (after what is queued there) and wait
    for it, without the GIL where the CUDA runtime can be called directly."""
    lib = _cudart() if stream is not None and (source.is_cuda or target.is_cuda) else None
    if lib is None:
        target.copy_(source, non_blocking=stream is not None)
        if stream is not None:
            stream.synchronize()
        return
    handle = ctypes.c_void_p(stream.cuda_stream)
    rc = lib.cudaMemcpyAsync(target.data_ptr(), source.data_ptr(), target.numel(), _MEMCPY_DEFAULT, handle)
    rc = rc or lib.cudaStreamSynchronize(handle)
    if rc:
        raise RuntimeError(f"CUDA error {rc} copying {target.numel()} bytes to host memory")


class HostArena:
    """One block of host memory holding a save's tensors, shareable with the writer process."""

    _ids = itertools.count()

    def __init__(self, nbytes: int, *, pin: bool, device: torch.device | None = None, path: str | None = None):
        self.id = next(HostArena._ids)
        self.nbytes = max(nbytes, mmap.PAGESIZE)
        self.fd: int | None = None
        self.path = path
        if path is not None:  # a file (in /dev/shm: the memory tier's slots outlive this process)
            self.fd = open_own_file(path)  # never through a link, a device or a second name
        elif writer_process.supported():  # shareable with the writer process
            self.fd = os.memfd_create("cairn-staging", os.MFD_CLOEXEC)
        if self.fd is None:
            self.mmap = mmap.mmap(-1, self.nbytes)
        else:
            try:
                os.ftruncate(self.fd, self.nbytes)
                self.mmap = mmap.mmap(self.fd, self.nbytes)
            except BaseException:
                os.close(self.fd)
                raise
        self._base = torch.frombuffer(self.mmap, dtype=torch.uint8)
        self.base_ptr = self._base.data_ptr()
        self.pinned = False  # every page registered with CUDA (in pieces of REGISTER_PIECE bytes)
        self._registered: list[int] = []  # the pieces' start pointers, for cudaHostUnregister
        if pin:
            self.pin(device)

    def pin(self, device: torch.device | None, pace_s: float = 0.0) -> bool:
        """Register the arena with CUDA (page-locked, for every context), ``REGISTER_PIECE`` bytes at
        a time, each piece's pages faulted in just before (``pretouch``), sleeping ``pace_s``
        between pieces; True once every piece is registered.

        Both hold something the training loop needs: faulting in gigabytes holds the process's
        memory map (a step's own allocations wait), registering holds the driver (on an H200 a
        training loop's next CUDA call waited for all 16 GB, 0.8 s, registered in one call or
        back to back; benchmarks/results/h200x1_recovery_probe.json). Piece by piece, paced, a
        step waits for one piece at most. A copy into or out of the arena must lie inside one
        piece (CUDA refuses one that spans two): ``HostStager`` cuts its copies at multiples of
        ``PIECE``, which divides ``REGISTER_PIECE``."""
        if self.pinned:
            return True
        with torch.cuda.device(device):
            for start in range(len(self._registered) * REGISTER_PIECE, self.nbytes, REGISTER_PIECE):
                length = min(REGISTER_PIECE, self.nbytes - start)
                self.pretouch(start, length)
                rc = _host_register(self.base_ptr + start, length)
                if rc != 0:
                    logger.warning("cudaHostRegister of %.1f MB of staging memory failed (error %d); staging "
                                   "into pageable memory (slower)", self.nbytes / 1e6, rc)
                    self.unpin()
                    return False
                self._registered.append(self.base_ptr + start)
                if pace_s:
                    time.sleep(pace_s)
        self.pinned = True
        return True

    def unpin(self) -> None:
        self.pinned = False
        for pointer in self._registered:
            _host_unregister(pointer)
        self._registered = []

    def pretouch(self, start: int = 0, length: int | None = None, pace_s: float = 0.0) -> None:
        """Fault the pages of ``[start, start + length)`` in now (default: all), keeping what they
        hold, so that neither pinning nor a save's copies wait on the kernel allocating memory;
        ``REGISTER_PIECE`` bytes per call (no call holds the memory map for long), ``pace_s``
        between calls."""
        end = self.nbytes if length is None else start + length
        for piece in range(start, end, REGISTER_PIECE):
            count = min(REGISTER_PIECE, end - piece)
            try:  # MADV_POPULATE_WRITE (Linux 5.14): allocates without writing; Python < 3.14 has no name for it
                self.mmap.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23), piece, count)
            except (OSError, ValueError):
                self._base[piece:piece + count].add_(0)  # writes every page, contents kept
            if pace_s:
                time.sleep(pace_s)

    def tensor(self, offset: int, like: torch.Tensor) -> torch.Tensor:
        """A contiguous tensor shaped like ``like`` at ``offset``, whose storage is exactly its bytes."""
        size = nbytes(like)
        if size == 0:
            return torch.empty(like.shape, dtype=like.dtype)
        flat = torch.frombuffer(self.mmap, dtype=torch.uint8, count=size, offset=offset)
        return flat.view(like.dtype).view(like.shape)

    def offset_of(self, tensor: torch.Tensor) -> int | None:
        offset = tensor.data_ptr() - self.base_ptr
        return offset if 0 <= offset and offset + nbytes(tensor) <= self.nbytes else None

    def close(self) -> None:
        self.unpin()
        del self._base
        try:
            self.mmap.close()
        except BufferError:  # tensors still point into it; the mapping goes when they do
            pass
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


SNAPSHOT_SPARE_FRACTION = 0.10
SNAPSHOT_SPARE_MIN = 4 << 30


def snapshot_fits(needed: int, free: int, total: int) -> bool:
    """Whether a device snapshot of ``needed`` bytes leaves 10% of the device (>= 4 GiB) free.

    Decided after the first training step: the caching allocator then holds what a step
    needs at its peak, so ``free`` is what the steps leave unused.
    """
    return needed + max(SNAPSHOT_SPARE_MIN, int(SNAPSHOT_SPARE_FRACTION * total)) <= free


class DeviceBuffers:
    """Device memory for one snapshot of a state, shared by the stagers that take turns with it
    (the memory tier's slots: one snapshot in flight at a time)."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self._layout: list | None = None
        self.allocated_bytes = 0

    def holds(self, leaves: list[tuple[str, torch.Tensor]]) -> bool:
        return self._layout == _device_layout(leaves)

    def for_leaves(self, leaves: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not self.holds(leaves):
            self.buffers = {path: torch.empty(local.shape, dtype=local.dtype, device=local.device)
                            for path, local in leaves}
            self.allocated_bytes += sum(nbytes(b) for b in self.buffers.values())
            self._layout = _device_layout(leaves)
        return self.buffers

    def release(self) -> None:
        self.buffers, self._layout = {}, None


def _device_layout(leaves: list[tuple[str, torch.Tensor]]) -> list:
    return [(path, local.shape, local.dtype, local.device) for path, local in leaves]


class HostStager:
    """Copies a state dict's tensors into host buffers; keeps the buffers when ``reuse``.

    ``device_snapshot``: copy into device buffers first (see the module doc): "on", "off", or
    "auto" (``snapshot_fits`` decides when the reused buffers are made, after the first step).
    ``device_buffers``: those buffers, shared with other stagers (default: its own).
    Every copy between device and arena is cut at multiples of ``PIECE`` bytes of the arena.
    """

    def __init__(self, *, reuse: bool, pin_memory: bool, device_snapshot: str | bool = "off",
                 arena_path: str | None = None, device_buffers: DeviceBuffers | None = None):
        if isinstance(device_snapshot, bool):
            device_snapshot = "on" if device_snapshot else "off"
        if device_snapshot not in ("auto", "on", "off"):
            raise ValueError(f"device_snapshot must be auto, on or off (got {device_snapshot!r})")
        self.reuse = reuse
        self.arena_path = arena_path  # a file for the arena instead of anonymous shared memory
        self.pin_memory = pin_memory and torch.cuda.is_available()
        # "auto" is settled in _prepare; never without kept buffers (a snapshot made per save
        # would allocate a shard of device memory at every save).
        self.snapshot_mode = device_snapshot if torch.cuda.is_available() else "off"
        if self.snapshot_mode == "auto" and not reuse:
            self.snapshot_mode = "off"
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._layout: list[tuple[str, torch.Size, torch.dtype]] | None = None
        self._buffers: dict[str, torch.Tensor] = {}  # path -> host buffer (a view into the arena)
        self._device = device_buffers if device_buffers is not None else DeviceBuffers()
        self._device_buffers: dict[str, torch.Tensor] = {}
        self._ring: list[torch.Tensor] | None = None  # pinned pieces for pageable arenas (see _copy_through_ring)
        self._copiers: ThreadPoolExecutor | None = None
        self.arena: HostArena | None = None
        self.on_release: Callable[[HostArena], None] | None = None  # before an arena is closed
        self.allocated_bytes = 0
        self.allocations = 0  # arenas made: one per save layout when reusing, one per save otherwise

    @property
    def device_snapshot(self) -> bool:
        """Whether saves go through a device snapshot (False while "auto" is undecided)."""
        return self.snapshot_mode == "on"

    @property
    def device_allocated_bytes(self) -> int:
        return self._device.allocated_bytes

    @property
    def retained_bytes(self) -> int:
        return sum(nbytes(b) for b in self._buffers.values()) if self.reuse else 0

    def prepare(self, state_dict: dict, pace: bool = True) -> None:
        """Make the buffers for ``state_dict``'s layout now (the first save then finds them);
        ``pace``: register them with CUDA piece by piece, letting the training loop's own calls
        between (see ``HostArena.pin``)."""
        leaves = [(path, local_tensor(tensor).detach()) for path, tensor in tensor_leaves(state_dict)]
        with self._on_stream():
            self._prepare(leaves, pace=pace)

    def _on_stream(self) -> contextlib.AbstractContextManager:
        """Make the side stream and its device current (nothing on CPU hosts).

        The device, not only the stream: a new thread's current device is 0, and pinned
        allocations or events made there would open a context on another rank's GPU.
        """
        if self._stream is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(torch.cuda.device(self._stream.device))
        stack.enter_context(torch.cuda.stream(self._stream))
        return stack

    def _prepare(self, leaves: list[tuple[str, torch.Tensor]], pace: bool = False) -> None:
        """Buffers for this layout: the kept ones when it has not changed, else new ones."""
        layout = [(path, local.shape, local.dtype) for path, local in leaves]
        if self.arena is not None and layout == self._layout:
            return
        self.release()
        offsets, total = [], 0
        for _, local in leaves:
            offsets.append(total)
            total += -(-nbytes(local) // _ALIGN) * _ALIGN
        device = self._stream.device if self._stream is not None else None
        if self.snapshot_mode == "auto":
            needed = sum(nbytes(local) for _, local in leaves)
            free, total_memory = torch.cuda.mem_get_info(device)
            fits = self._device.holds(leaves) or snapshot_fits(needed, free, total_memory)
            self.snapshot_mode = "on" if fits else "off"
            logger.info("%s %s a device snapshot (Config.device_snapshot auto): %.1f GB needed, "
                        "%.1f GB of %.1f GB free on %s", "memory snapshots" if self.arena_path else "async saves",
                        "take" if self.device_snapshot else "skip", needed / 1e9, free / 1e9, total_memory / 1e9,
                        device)
        self.arena = HostArena(total, pin=False, device=device, path=self.arena_path)
        if self.pin_memory:
            self.arena.pin(device, pace_s=PIN_PACE_S if pace else 0.0)
        elif self.reuse:
            self.arena.pretouch(pace_s=PIN_PACE_S if pace else 0.0)
        self.allocations += 1
        self.allocated_bytes += self.arena.nbytes
        self._buffers = {path: self.arena.tensor(offset, local) for (path, local), offset in zip(leaves, offsets)}
        if self.device_snapshot:
            self._device_buffers = self._device.for_leaves(leaves)
        self._layout = layout

    def buffer_layout(self) -> list[dict]:
        """Where each staged tensor lies in the arena: path, shape, dtype, offset, bytes (in leaf order)."""
        out = []
        for path, buffer in self._buffers.items():
            located = self.locate(buffer)
            out.append({"path": path, "shape": list(buffer.shape), "dtype": str(buffer.dtype).removeprefix("torch."),
                        "offset": located[1] if located else None, "nbytes": nbytes(buffer)})
        return out

    def release(self) -> None:
        """Give the buffers back (the next save makes new ones)."""
        self._buffers, self._device_buffers, self._layout, self._ring = {}, {}, None, None
        if self._copiers is not None:
            self._copiers.shutdown(wait=True)
            self._copiers = None
        if self.arena is not None:
            if self.on_release is not None:
                self.on_release(self.arena)
            self.arena.close()
            self.arena = None

    def locate(self, tensor: torch.Tensor) -> tuple[HostArena, int] | None:
        """The arena and byte offset of a staged tensor, if it is one."""
        if self.arena is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
            return None
        offset = self.arena.offset_of(tensor)
        return None if offset is None else (self.arena, offset)

    def ready_marker(self) -> torch.cuda.Event | None:
        """On GPU hosts, an event on the training stream now: the copies start after it."""
        if self._stream is None:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def enqueue(self, state_dict: dict, ready: torch.cuda.Event | None = None
                ) -> tuple[dict, torch.cuda.Event | None, Callable[..., None]]:
        """Queue the copies of ``state_dict`` into host buffers; returns (host copy, gate, drain).

        ``gate``: the state may change once it has passed (None: already); ``drain(progress=None)``
        returns once the host copy is complete, calling ``progress(offset)`` as the arena's bytes
        below ``offset`` become final (in order). ``ready`` (from ``ready_marker``, taken on the
        training thread) orders the copies after the work that produced the state.
        """
        leaves = [(path, local_tensor(tensor).detach()) for path, tensor in tensor_leaves(state_dict)]
        copies: dict[str, torch.Tensor] = {}
        if self._stream is None:
            self._prepare(leaves)
            for path, local in leaves:
                copies[path] = self._buffers[path].copy_(local)
            return _rebuild(state_dict, _by_id(state_dict, copies)), None, self._all_done
        with self._on_stream():
            self._prepare(leaves)
            if ready is not None:
                self._stream.wait_event(ready)
            else:
                self._stream.wait_stream(torch.cuda.default_stream(self._stream.device))
            copies = {path: self._buffers[path] for path, _ in leaves}
            staged = _rebuild(state_dict, _by_id(state_dict, copies))
            if self.device_snapshot:
                for path, local in leaves:
                    self._device_buffers[path].copy_(local, non_blocking=True)
                gate = torch.cuda.Event()
                gate.record(self._stream)
                return staged, gate, self._drain_snapshot
            pieces = self._pieces({path: local for path, local in leaves})
            if not self.arena.pinned and any(local.is_cuda for _, local in leaves):
                # pageable buffers: through pinned pieces, before the state may change (no gate left)
                self._copy_through_ring(pieces)
                return staged, None, self._all_done
            for source, target in pieces:
                target.copy_(source, non_blocking=source.is_cuda)
            done = torch.cuda.Event()
            done.record(self._stream)

        def drain(progress: Callable[[int], None] | None = None) -> None:
            done.synchronize()
            self._all_done(progress)

        return staged, done, drain

    def _all_done(self, progress: Callable[[int], None] | None = None) -> None:
        if progress is not None and self.arena is not None:
            progress(self.arena.nbytes)

    def _pieces(self, sources: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(source piece, arena piece) byte views covering ``sources``, cut at every multiple of
        ``PIECE`` bytes of the arena, in the arena's order."""
        pieces = []
        for path, source in sources.items():
            target = self._buffers[path]
            if source.numel() == 0:
                continue
            source_bytes = source.reshape(-1).view(torch.uint8)
            target_bytes = target.reshape(-1).view(torch.uint8)
            base = self.arena.offset_of(target)
            start, end = 0, target_bytes.numel()
            while start < end:
                stop = min(end, ((base + start) // PIECE + 1) * PIECE - base)
                pieces.append((source_bytes[start:stop], target_bytes[start:stop]))
                start = stop
        return pieces

    def _end_offset(self, target: torch.Tensor) -> int:
        return target.data_ptr() + target.numel() - self.arena.base_ptr

    def _copy_through_ring(self, pieces: list[tuple[torch.Tensor, torch.Tensor]],
                           progress: Callable[[int], None] | None = None) -> None:
        """Copy ``pieces`` into a pageable arena through ``RING`` reused pinned buffers of ``PIECE``
        bytes: one piece at a time to a pinned buffer (on the side stream), then on to the arena
        by one of ``COPIERS`` threads while the next piece crosses; ``progress`` in the arena's order.

        A device-to-host copy into pageable memory is done by the driver synchronously, through
        its own staging, and holds the driver while it runs: the training thread's kernel
        launches wait behind it (the 1B run of benchmarks/RESULTS.md, session 8: the step after
        each ``async`` save took 1.5 s instead of 0.23 s).
        """
        if self._ring is None:
            self._ring = [torch.empty(PIECE, dtype=torch.uint8, pin_memory=self._stream is not None)
                          for _ in range(RING)]
        if self._copiers is None:
            self._copiers = ThreadPoolExecutor(max_workers=COPIERS, thread_name_prefix="cairn-copy")
        free = collections.deque(range(len(self._ring)))
        pending: collections.deque = collections.deque()  # (future, ring index, arena offset done), in order

        def finish_oldest() -> None:
            future, index, end = pending.popleft()
            future.result()
            free.append(index)
            if progress is not None:
                progress(end)

        with self._on_stream():
            for source, target in pieces:
                while pending and (not free or pending[0][0].done()):
                    finish_oldest()
                index = free.popleft()
                count = target.numel()
                bounce = self._ring[index][:count]
                _copy_now(bounce, source, self._stream)
                future = self._copiers.submit(ctypes.memmove, target.data_ptr(), bounce.data_ptr(), count)
                pending.append((future, index, self._end_offset(target)))
            while pending:
                finish_oldest()

    def _drain_snapshot(self, progress: Callable[[int], None] | None = None) -> None:
        """Copy the device snapshot to host, ``PIECE`` bytes at a time, one piece in flight.

        Copies in one direction share the GPU's copy engine: a whole state queued at once, or
        several large pieces, would hold every small device-to-host copy of the training loop
        (a loss's ``.item()``) behind them for the length of the transfer. One ``PIECE`` at a
        time, such a copy waits for one piece at most (see ``PIECE``)."""
        pieces = self._pieces(self._device_buffers)
        if not self.arena.pinned:
            self._copy_through_ring(pieces, progress)
            self._all_done(progress)
            return
        with self._on_stream():
            for source, target in pieces:
                _copy_now(target, source, self._stream)
                if progress is not None:
                    progress(self._end_offset(target))
        self._all_done(progress)

    def stage(self, state_dict: dict, ready: torch.cuda.Event | None = None) -> dict:
        """A host copy of ``state_dict`` (same structure); returns once every copy has landed."""
        staged, _, drain = self.enqueue(state_dict, ready)
        drain()
        return staged


def _by_id(state_dict: dict, copies: dict[str, torch.Tensor]) -> dict[int, torch.Tensor]:
    return {id(tensor): copies[path] for path, tensor in tensor_leaves(state_dict)}


def _rebuild(obj: Any, copies: dict[int, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        return {key: _rebuild(value, copies) for key, value in obj.items()}
    if isinstance(obj, list):
        return [_rebuild(value, copies) for value in obj]
    if isinstance(obj, tuple):
        return tuple(_rebuild(value, copies) for value in obj)
    if isinstance(obj, DTensor):
        # The host copy as the local tensor of a DTensor with the original's layout. Not
        # DTensor.from_local: it moves a CPU local tensor to the mesh's device (the calling
        # thread's current GPU), which on a GPU mesh copied every staged shard back to device
        # memory, on device 0 for every rank.
        return DTensor(copies[id(obj)], obj._spec, requires_grad=False)
    if isinstance(obj, torch.Tensor):
        return copies[id(obj)]
    return obj


# While a save's worker thread runs Python (planning and committing; with
# ``--checkpoint.async_writer thread`` also the writes), the training thread may wait up to
# Python's GIL switch interval (5 ms) each time it wants the GIL back (after every op it
# dispatched without the GIL). A shorter interval hands it back sooner; the worker spends most
# of its time waiting or in system calls and loses little. Seconds; 0 leaves Python's own.
SWITCH_INTERVAL_ENV = "CAIRN_WRITER_SWITCH_INTERVAL"
DEFAULT_SWITCH_INTERVAL = 0.0005


def _writer_switch_interval() -> float:
    raw = os.environ.get(SWITCH_INTERVAL_ENV)
    try:
        return DEFAULT_SWITCH_INTERVAL if raw is None else float(raw)
    except ValueError:
        raise ValueError(f"{SWITCH_INTERVAL_ENV}={raw!r}: expected seconds, e.g. 0.0005 (0: Python's default)") \
            from None


@dataclasses.dataclass
class StagedElsewhere:
    """A host copy of the state that another stager makes (the memory tier's snapshot of the same
    step): ``host_copy`` resolves to the staged state dict once the copy is complete; ``release``
    runs once the save is done with it (the stager may then reuse its buffers)."""

    host_copy: Future
    stager: HostStager
    release: Callable[[], None]


class AsyncSaver:
    """One background worker: stage into host memory, then write (in the writer process) and commit.

    ``timeline`` holds the last save's phases in seconds after ``submit`` (for logs and the
    benchmark): ``queued`` (copies queued), ``gate`` (the state may change), ``staged`` (host
    copy complete), ``data_start``/``data_done`` (the files being written), ``done``.
    """

    def __init__(self, *, reuse_buffers: bool, pin_memory: bool | None = None, writer: str = "process",
                 device_snapshot: str | bool = "off"):
        if writer not in ASYNC_WRITERS:
            raise ValueError(f"async writer must be one of {ASYNC_WRITERS} (got {writer!r})")
        pin_memory = reuse_buffers if pin_memory is None else pin_memory
        self.stager = HostStager(reuse=reuse_buffers, pin_memory=pin_memory, device_snapshot=device_snapshot)
        self.writer_process: writer_process.WriterProcess | None = None
        if writer == "process":
            if writer_process.supported():
                self.writer_process = writer_process.WriterProcess()
                self.stager.on_release = lambda arena: self.writer_process.release(arena.id)
            else:
                logger.warning("Config.async_writer process needs Linux (memfd); writing from a thread")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cairn-ckpt")
        self._queued = threading.Event()
        self._queued.set()
        self._gate: torch.cuda.Event | None = None
        self._future: Future | None = None
        self.last_stage_seconds = 0.0
        self.prepare_seconds: float | None = None
        self.timeline: dict[str, float] = {}
        self._start = 0.0
        self._source = self.stager  # the stager whose arenas the save in flight writes from

    @property
    def in_flight(self) -> bool:
        """Whether a save (or the buffers' preparation) is still running."""
        return self._future is not None and not self._future.done()

    def submit(self, step: int, state_dict: dict, write: Callable[[dict], Any],
               staged_by: StagedElsewhere | None = None) -> Future:
        """Stage ``state_dict`` and run ``write(staged)`` on the worker; returns its future.

        ``staged_by``: the state was staged by another stager (the memory tier's snapshot of the
        same step): write from that host copy, once it is complete, instead of staging again.
        At most one save is in flight: this first waits for the previous one (callers that
        must not wait check ``in_flight`` first)."""
        self.wait()
        if staged_by is not None:
            return self._submit_staged(staged_by, write)
        self._queued.clear()
        self._gate = None
        start = self._start = time.perf_counter()
        timeline: dict[str, float] = {}
        self.timeline = timeline
        ready = self.stager.ready_marker()
        interval = _writer_switch_interval()

        def mark(name: str) -> None:
            timeline[name] = round(time.perf_counter() - start, 6)

        def job():
            try:
                staged, gate, drain = self.stager.enqueue(state_dict, ready)
                self._gate = gate
            finally:
                mark("queued")
                self._queued.set()
            if gate is not None:
                gate.synchronize()
            mark("gate")
            drain()
            mark("staged")
            self.last_stage_seconds = timeline["staged"]
            before = sys.getswitchinterval()
            if 0 < interval < before:
                sys.setswitchinterval(interval)
            try:
                return write(staged)
            finally:
                sys.setswitchinterval(before)
                del staged
                if not self.stager.reuse:
                    self.stager.release()
                mark("done")

        self._future = self._executor.submit(job)
        return self._future

    def _submit_staged(self, staged_by: StagedElsewhere, write: Callable[[dict], Any]) -> Future:
        start = self._start = time.perf_counter()
        timeline: dict[str, float] = {"queued": 0.0, "gate": 0.0}
        self.timeline = timeline
        self._gate = None
        self._queued.set()  # the training thread waits for the snapshot's gate, not for this

        def job():
            try:
                staged = staged_by.host_copy.result()
                timeline["staged"] = round(time.perf_counter() - start, 6)
                self.last_stage_seconds = timeline["staged"]
                self._source = staged_by.stager
                return write(staged)
            finally:
                self._source = self.stager
                staged_by.release()
                timeline["done"] = round(time.perf_counter() - start, 6)

        self._future = self._executor.submit(job)
        return self._future

    def prepare(self, state_dict: dict) -> None:
        """Allocate (and pin) the reused host buffers for ``state_dict``'s layout in the background.

        Called once training has taken its first step (the optimizer state exists then), so the
        first save neither waits for gigabytes to be pinned nor stalls training meanwhile.
        """
        if not self.stager.reuse or self.stager.arena is not None or self._future is not None:
            return
        start = time.perf_counter()

        def job() -> None:
            try:
                self.stager.prepare(state_dict)
            except Exception as e:  # noqa: BLE001 - the first save allocates instead, and reports
                logger.warning("could not allocate the async staging buffers in advance (%s: %s); the first "
                               "save will", type(e).__name__, e)
            self.prepare_seconds = time.perf_counter() - start

        self._future = self._executor.submit(job)

    def write_data(self, writer, plan, planner) -> list:
        """``CairnStorageWriter.write_data`` in the writer process (set as the writer's delegate)."""
        sources: list = []
        arenas: dict[int, tuple[int, int]] = {}
        with zip_crc32_off():  # resolving a non-tensor item torch.saves it: the same bytes as a local write
            resolved = [planner.resolve_data(item) for item in plan.items]
        for item, data in zip(plan.items, resolved):
            if item.type == WriteItemType.BYTE_IO:
                sources.append(("bytes", data.getvalue() if hasattr(data, "getvalue") else bytes(data)))
                continue
            found = self._source.locate(data)
            if found is None:  # not a staged buffer (nothing cairn saves today): send it by value
                sources.append(("tensor", data.detach().cpu().contiguous().clone()))
                continue
            arena, offset = found
            arenas[arena.id] = (arena.fd, arena.nbytes)
            sources.append(("arena", arena.id, offset, nbytes(data), data.dtype, list(data.shape)))
        self.timeline["data_start"] = round(time.perf_counter() - self._start, 6)
        try:
            return self.writer_process.write(writer, plan, sources, arenas)
        except writer_process.WriterProcessError as e:
            raise WriterDiedError(f"rank {writer.rank}: {e}. Step {writer.step} was not committed; earlier steps in "
                            f"{writer.folder_text} are untouched") from e
        finally:
            self.timeline["data_done"] = round(time.perf_counter() - self._start, 6)

    def wait_for_staging(self) -> None:
        """Before the state changes: wait until the copies are queued, then (GPU) order the stream after them."""
        self._queued.wait()
        gate, self._gate = self._gate, None
        if gate is not None:
            torch.cuda.current_stream().wait_event(gate)

    def wait(self) -> Any:
        """Block until the in-flight save (if any) is written and committed; re-raise its error."""
        future, self._future = self._future, None
        if future is None:
            return None
        if getattr(future, "cairn_reported", False) and future.exception() is not None:
            return None  # its caller already got this save's error from its handle
        return future.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._executor.shutdown(wait=True)
            self.stager.release()
            if self.writer_process is not None:
                self.writer_process.close()


class CairnAsyncStager(AsyncStager):
    """cairn's host staging as DCP's ``AsyncStager``: ``dcp.async_save(state, storage_writer=...,
    async_stager=CairnAsyncStager())`` copies the state into host buffers made at the first save
    and reused by every later one (pinned on CUDA hosts; ``pin_memory=False``: pageable, touched
    once), instead of DCP's fresh copy per save. ``stage`` returns once the copy is complete, so
    the caller may change the state as soon as ``dcp.async_save`` returns; close it after the
    last save."""

    _synchronize_after_execute = False

    def __init__(self, *, pin_memory: bool = True):
        self.stager = HostStager(reuse=True, pin_memory=pin_memory)

    def stage(self, state_dict: dict) -> dict:
        return self.stager.stage(state_dict)

    def synchronize_staging(self) -> None:
        """Nothing to wait for: ``stage`` returns with the copy complete."""

    def close(self) -> None:
        self.stager.release()
