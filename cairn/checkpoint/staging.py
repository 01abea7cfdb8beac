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

import contextlib
import ctypes
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
from cairn.checkpoint.errors import SaveError
from cairn.checkpoint.state import local_tensor, nbytes, tensor_leaves
from cairn.checkpoint.writer import zip_crc32_off
from cairn.config.job_config import ASYNC_WRITERS

logger = logging.getLogger("cairn")

_ALIGN = 4096  # each tensor starts on a page of its own in the arena
_D2H_PIECE = 64 << 20  # bytes per device-to-host copy from a device snapshot


@functools.lru_cache(maxsize=None)
def _cudart_host_register():
    """(cudaHostRegister, cudaHostUnregister) of the CUDA runtime torch loaded, called through
    ctypes, which lets go of the GIL while the driver pins gigabytes (torch's binding holds
    it); None where no shared libcudart is loaded."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "libcudart.so" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            register, unregister = lib.cudaHostRegister, lib.cudaHostUnregister
        except (OSError, AttributeError):
            continue
        register.argtypes, register.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint], ctypes.c_int
        unregister.argtypes, unregister.restype = [ctypes.c_void_p], ctypes.c_int
        return register, unregister
    return None


def _host_register(ptr: int, nbytes: int) -> int:
    # Portable: page-locked for every CUDA context, as DCP registers its shared buffers.
    calls = _cudart_host_register()
    return calls[0](ptr, nbytes, 1) if calls else int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 1))


def _host_unregister(ptr: int) -> None:
    calls = _cudart_host_register()
    if calls:
        calls[1](ptr)
    else:
        torch.cuda.cudart().cudaHostUnregister(ptr)


class HostArena:
    """One block of host memory holding a save's tensors, shareable with the writer process."""

    _ids = itertools.count()

    def __init__(self, nbytes: int, *, pin: bool, device: torch.device | None = None, path: str | None = None):
        self.id = next(HostArena._ids)
        self.nbytes = max(nbytes, mmap.PAGESIZE)
        self.fd: int | None = None
        self.path = path
        if path is not None:  # a file (in /dev/shm: the memory tier's slots outlive this process)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
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
        self.pinned = False
        if pin:
            with torch.cuda.device(device):
                rc = _host_register(self.base_ptr, self.nbytes)
            if rc != 0:
                logger.warning("cudaHostRegister of %.1f MB of staging memory failed (error %d); staging "
                               "into pageable memory (slower)", self.nbytes / 1e6, rc)
            self.pinned = rc == 0

    def pretouch(self) -> None:
        """Fault every page in now (pinning does that for pinned arenas), so a save's copies
        into this arena never wait on the kernel allocating memory."""
        populate = getattr(mmap, "MADV_POPULATE_WRITE", None)
        if populate is not None:
            with contextlib.suppress(OSError):
                self.mmap.madvise(populate)
                return
        self._base.zero_()  # writes every page once; releases the GIL

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
        if self.pinned:
            _host_unregister(self.base_ptr)
            self.pinned = False
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


class HostStager:
    """Copies a state dict's tensors into host buffers; keeps the buffers when ``reuse``.

    ``device_snapshot``: copy into device buffers first (see the module doc): "on", "off", or
    "auto" (``snapshot_fits`` decides when the reused buffers are made, after the first step).
    """

    def __init__(self, *, reuse: bool, pin_memory: bool, device_snapshot: str | bool = "off",
                 arena_path: str | None = None):
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
        self._device_buffers: dict[str, torch.Tensor] = {}
        self._bounce: list[torch.Tensor] | None = None  # pinned pieces for pageable buffers (see _copy_through_bounce)
        self.arena: HostArena | None = None
        self.on_release: Callable[[HostArena], None] | None = None  # before an arena is closed
        self.allocated_bytes = 0
        self.allocations = 0  # arenas made: one per save layout when reusing, one per save otherwise
        self.device_allocated_bytes = 0

    @property
    def device_snapshot(self) -> bool:
        """Whether saves go through a device snapshot (False while "auto" is undecided)."""
        return self.snapshot_mode == "on"

    @property
    def retained_bytes(self) -> int:
        return sum(nbytes(b) for b in self._buffers.values()) if self.reuse else 0

    def prepare(self, state_dict: dict) -> None:
        """Make the buffers for ``state_dict``'s layout now (the first save then finds them)."""
        leaves = [(path, local_tensor(tensor).detach()) for path, tensor in tensor_leaves(state_dict)]
        with self._on_stream():
            self._prepare(leaves)

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

    def _prepare(self, leaves: list[tuple[str, torch.Tensor]]) -> None:
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
            self.snapshot_mode = "on" if snapshot_fits(needed, free, total_memory) else "off"
            logger.info("async saves %s a device snapshot (Config.device_snapshot auto): %.1f GB needed, "
                        "%.1f GB of %.1f GB free on %s", "take" if self.device_snapshot else "skip",
                        needed / 1e9, free / 1e9, total_memory / 1e9, device)
        self.arena = HostArena(total, pin=self.pin_memory, device=device, path=self.arena_path)
        if self.reuse and not self.arena.pinned:
            self.arena.pretouch()
        self.allocations += 1
        self.allocated_bytes += self.arena.nbytes
        self._buffers = {path: self.arena.tensor(offset, local) for (path, local), offset in zip(leaves, offsets)}
        if self.device_snapshot:
            self._device_buffers = {path: torch.empty(local.shape, dtype=local.dtype, device=local.device)
                                    for path, local in leaves}
            self.device_allocated_bytes += sum(nbytes(b) for b in self._device_buffers.values())
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
        self._buffers, self._device_buffers, self._layout, self._bounce = {}, {}, None, None
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
                ) -> tuple[dict, torch.cuda.Event | None, Callable[[], None]]:
        """Queue the copies of ``state_dict`` into host buffers; returns (host copy, gate, drain).

        ``gate``: the state may change once it has passed (None: already); ``drain()`` returns
        once the host copy is complete. ``ready`` (from ``ready_marker``, taken on the training
        thread) orders the copies after the work that produced the state.
        """
        leaves = [(path, local_tensor(tensor).detach()) for path, tensor in tensor_leaves(state_dict)]
        copies: dict[str, torch.Tensor] = {}
        if self._stream is None:
            self._prepare(leaves)
            for path, local in leaves:
                copies[path] = self._buffers[path].copy_(local)
            return _rebuild(state_dict, _by_id(state_dict, copies)), None, lambda: None
        with self._on_stream():
            self._prepare(leaves)
            if ready is not None:
                self._stream.wait_event(ready)
            else:
                self._stream.wait_stream(torch.cuda.default_stream(self._stream.device))
            if self.device_snapshot:
                for path, local in leaves:
                    self._device_buffers[path].copy_(local, non_blocking=True)
                    copies[path] = self._buffers[path]
                gate = torch.cuda.Event()
                gate.record(self._stream)
                return _rebuild(state_dict, _by_id(state_dict, copies)), gate, self._drain_snapshot
            if not self.arena.pinned and any(local.is_cuda for _, local in leaves):
                # pageable buffers: through pinned pieces, before the state may change (no gate left)
                self._copy_through_bounce(self._pieces({path: local for path, local in leaves}))
                copies = {path: self._buffers[path] for path, _ in leaves}
                return _rebuild(state_dict, _by_id(state_dict, copies)), None, lambda: None
            for path, local in leaves:
                copies[path] = self._buffers[path].copy_(local, non_blocking=local.is_cuda)
            done = torch.cuda.Event()
            done.record(self._stream)
        return _rebuild(state_dict, _by_id(state_dict, copies)), done, done.synchronize

    def _pieces(self, sources: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(device piece, host piece) pairs of at most ``_D2H_PIECE`` bytes covering ``sources``."""
        pieces = []
        for path, device in sources.items():
            source, target = device.reshape(-1), self._buffers[path].view(-1)
            step = max(1, _D2H_PIECE // max(1, device.element_size()))
            pieces += [(source[i:i + step], target[i:i + step]) for i in range(0, source.numel(), step)]
        return pieces

    def _copy_through_bounce(self, pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Device to pageable host memory through three reused pinned buffers of ``_D2H_PIECE`` bytes.

        A device-to-host copy into pageable memory is done by the driver synchronously, through
        its own staging, and holds the driver while it runs: the training thread's kernel
        launches wait behind it (the 1B run of benchmarks/RESULTS.md, session 8: the step after
        each ``async`` save took 1.5 s instead of 0.23 s). Into pinned memory the copy is
        asynchronous on the side stream; the copy on to the pageable buffer is a host memcpy
        (no GIL, no driver), one piece behind.
        """
        if self._bounce is None:
            self._bounce = [torch.empty(_D2H_PIECE, dtype=torch.uint8, pin_memory=True) for _ in range(3)]
        free = list(self._bounce)
        pending: list[tuple[torch.cuda.Event, torch.Tensor, torch.Tensor]] = []

        def finish_oldest() -> None:
            event, bounce, target = pending.pop(0)
            event.synchronize()
            target.copy_(bounce[:target.numel()])
            free.append(bounce)

        with self._on_stream():
            for source, target in pieces:
                if source.numel() == 0:
                    continue
                if not free:
                    finish_oldest()
                bounce = free.pop(0)
                source_bytes, target_bytes = source.view(torch.uint8), target.view(torch.uint8)
                bounce[:source_bytes.numel()].copy_(source_bytes, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
                pending.append((event, bounce, target_bytes))
            while pending:
                finish_oldest()

    def _drain_snapshot(self) -> None:
        """Copy the device snapshot to host in pieces of ``_D2H_PIECE`` bytes, two in flight.

        Copies in one direction share the GPU's copy engine in the order they were queued: the
        whole state queued at once would hold every small device-to-host copy of the training
        loop (a loss's ``.item()``) behind it for the length of the transfer. Queued piece by
        piece, such a copy waits for one piece at most.
        """
        pieces = self._pieces(self._device_buffers)
        if not self.arena.pinned:
            self._copy_through_bounce(pieces)
            return
        in_flight: list[torch.cuda.Event] = []
        with self._on_stream():
            for source, target in pieces:
                target.copy_(source, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
                in_flight.append(event)
                if len(in_flight) > 2:
                    in_flight.pop(0).synchronize()
            for event in in_flight:
                event.synchronize()

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

    @property
    def in_flight(self) -> bool:
        """Whether a save (or the buffers' preparation) is still running."""
        return self._future is not None and not self._future.done()

    def submit(self, step: int, state_dict: dict, write: Callable[[dict], Any]) -> Future:
        """Stage ``state_dict`` and run ``write(staged)`` on the worker; returns its future.

        At most one save is in flight: this first waits for the previous one (callers that
        must not wait check ``in_flight`` first)."""
        self.wait()
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
            found = self.stager.locate(data)
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
            raise SaveError(f"rank {writer.rank}: {e}. Step {writer.step} was not committed; earlier steps in "
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
