"""The writer process: writes an async save's files from shared host memory.

An async save stages the state into host buffers (``staging.HostArena``: memfd-backed, so
another process can map them) and then only the file writing is left: serializing every
tensor record, hashing every byte, the ``write`` and ``fsync`` calls. In a thread of the
training process all of that competes for the GIL with the training loop, which hands the
GIL back at every op it dispatches. Here it runs in a child process instead, and the
training process only plans the save, hands over one message per save and commits.

Protocol (one Unix socket pair, length-prefixed pickles, file descriptors in ancillary data):

- ``("arena", arena_id, nbytes)`` + the arena's memfd: map it (once per arena);
- ``("release", arena_id)``: unmap it;
- ``("write", writer, plan, sources)``: run ``writer.write_data(plan, planner)`` where the
  planner resolves each write item from ``sources`` (bytes, or a slice of an arena);
  answers ``("ok", results)`` or ``("error", exception)``.

The child has no CUDA (``CUDA_VISIBLE_DEVICES`` is empty), takes no part in collectives and
dies with its parent (``PR_SET_PDEATHSIG``), so a crashed training run never leaves a writer
behind. What crosses the socket is pickled by cairn's own two processes; nothing read from
a checkpoint file is ever unpickled here.
"""

from __future__ import annotations

import ctypes
import io
import logging
import mmap
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

from cairn.checkpoint.faults import WRITER_PROCESS_ENV  # set in the child: its fault points take the parent too

logger = logging.getLogger("cairn")

_HEADER = struct.Struct("<Q")


def supported() -> bool:
    """Whether this platform can share staging memory with a writer process (Linux memfd)."""
    return hasattr(os, "memfd_create") and hasattr(socket, "send_fds") and sys.platform.startswith("linux")


# --- framing --------------------------------------------------------------------------------

def _send(sock: socket.socket, message: Any, fds: list[int] = ()) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    header = _HEADER.pack(len(payload))
    if fds:
        socket.send_fds(sock, [header], list(fds))
        sock.sendall(payload)
    else:
        sock.sendall(header + payload)


def _recv_exact(sock: socket.socket, n: int, fds: list[int]) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        data, new_fds, _, _ = socket.recv_fds(sock, n - got, 4)
        fds.extend(new_fds)
        if not data:
            return None
        chunks.append(data)
        got += len(data)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> tuple[Any, list[int]] | None:
    """The next message and the descriptors that came with it; None at end of stream."""
    fds: list[int] = []
    header = _recv_exact(sock, _HEADER.size, fds)
    if header is None:
        return None
    payload = _recv_exact(sock, _HEADER.unpack(header)[0], fds)
    if payload is None:
        return None
    return pickle.loads(payload), fds


# --- the training-process side ---------------------------------------------------------------

class WriterProcessError(RuntimeError):
    pass


class WriterProcess:
    """A child process that runs ``CairnStorageWriter.write_data`` for async saves."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self._mapped: set[int] = set()
        self.starts = 0
        self._start()

    def _start(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        root = str(Path(__file__).resolve().parents[2])  # the directory holding the cairn package
        env = dict(os.environ)
        env[WRITER_PROCESS_ENV] = "1"
        env["CUDA_VISIBLE_DEVICES"] = ""  # the child only writes host memory to files
        env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("OMP_NUM_THREADS", "1")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "cairn.checkpoint.writer_process", str(child.fileno())],
                pass_fds=[child.fileno()], env=env, stdin=subprocess.DEVNULL)
        finally:
            child.close()
        self._sock = parent
        self._mapped = set()
        self.starts += 1

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _died(self, doing: str) -> WriterProcessError:
        code = self._proc.wait() if self._proc is not None else None
        how = f"was killed by signal {-code}" if code is not None and code < 0 else f"exited with code {code}"
        pid = self.pid
        self._close_socket()
        self._proc = None
        return WriterProcessError(f"the checkpoint writer process (pid {pid}) {how} while {doing}")

    def write(self, writer, plan: SavePlan, sources: list, arenas: dict[int, tuple[int, int]]) -> list:
        """``writer.write_data(plan, ...)`` in the child; ``arenas``: id -> (memfd, nbytes) it must map."""
        with self._lock:
            if not self.alive():
                if self._proc is not None:
                    logger.warning("the checkpoint writer process (pid %s) is gone (exit code %s); starting "
                                   "a new one", self.pid, self._proc.poll())
                self._close_socket()
                self._start()
            try:
                for arena_id, (fd, nbytes) in arenas.items():
                    if arena_id not in self._mapped:
                        _send(self._sock, ("arena", arena_id, nbytes), [fd])
                        self._mapped.add(arena_id)
                _send(self._sock, ("write", writer, plan, sources))
                reply = _recv(self._sock)
            except OSError:
                reply = None
            if reply is None:
                raise self._died(f"writing step {getattr(writer, 'step', '?')}")
            (status, value), _ = reply
            if status == "error":
                raise value
            return value

    def release(self, arena_id: int) -> None:
        with self._lock:
            if arena_id in self._mapped and self.alive():
                try:
                    _send(self._sock, ("release", arena_id))
                except OSError:
                    pass
            self._mapped.discard(arena_id)

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        with self._lock:
            self._close_socket()  # the child sees end of stream and exits
            if self._proc is not None:
                try:
                    self._proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
                self._proc = None


# --- the child --------------------------------------------------------------------------------

class _Mapped:
    def __init__(self, fd: int, nbytes: int):
        self.mmap = mmap.mmap(fd, nbytes)
        os.close(fd)

    def tensor(self, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        # A tensor whose storage is exactly its bytes: torch.save writes a storage whole.
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.mmap, dtype=torch.uint8, count=nbytes, offset=offset).view(dtype).view(shape)

    def close(self) -> None:
        try:
            self.mmap.close()
        except BufferError:  # a tensor still points into it; the mapping goes with the process
            pass


class _SharedPlanner:
    """The one planner call ``write_data`` makes: the data of a write item."""

    def __init__(self, plan: SavePlan, sources: list, arenas: dict[int, _Mapped]):
        self._data: dict[Any, Any] = {}
        for item, source in zip(plan.items, sources):
            kind = source[0]
            if kind == "bytes":
                self._data[item.index] = source[1]
            elif kind == "arena":
                _, arena_id, offset, nbytes, dtype, shape = source
                self._data[item.index] = arenas[arena_id].tensor(offset, nbytes, dtype, shape)
            else:  # "tensor": a host tensor that was not in an arena, sent by value
                self._data[item.index] = source[1]

    def resolve_data(self, write_item: WriteItem) -> Any:
        data = self._data[write_item.index]
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(data)
        return data


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:  # the parent died before prctl
        os._exit(1)


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return WriterProcessError(f"{type(error).__name__}: {error}")


def main(fd: int) -> None:
    _die_with_parent()
    logging.basicConfig(level=logging.WARNING, format="[cairn writer %(process)d] %(message)s")
    torch.set_num_threads(1)
    sock = socket.socket(fileno=fd)
    arenas: dict[int, _Mapped] = {}
    while True:
        received = _recv(sock)
        if received is None:
            return
        message, fds = received
        kind = message[0]
        if kind == "arena":
            arenas[message[1]] = _Mapped(fds[0], message[2])
        elif kind == "release":
            mapped = arenas.pop(message[1], None)
            if mapped is not None:
                mapped.close()
        elif kind == "write":
            _, writer, plan, sources = message
            try:
                planner = _SharedPlanner(plan, sources, arenas)
                results = writer.write_data(plan, planner).value()
                del planner
                reply = ("ok", results)
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the trainer
                reply = ("error", _picklable(e))
            _send(sock, reply)


if __name__ == "__main__":
    main(int(sys.argv[1]))
