"""Disk I/O for the benchmarks: the sequential write and read that measure a disk's ceilings,
and cold reads (drop the page cache, or evict given files from it)."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

CHUNK = 8 << 20  # bytes per write / read call


def try_drop_caches() -> bool:
    """Drop the whole page cache (``/proc/sys/vm/drop_caches``: root and a writable /proc)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def evict(paths: list[Path]) -> None:
    """Evict each file's pages (flushed first: ``POSIX_FADV_DONTNEED`` leaves dirty pages in place)."""
    for path in paths:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).rglob("*") if p.is_file())


def write_file(path: Path, nbytes: int, block: bytes, writeback: bool = False) -> dict[str, float]:
    """Write ``nbytes`` of ``block`` (repeated) sequentially, then fsync: seconds until the
    last write returned (``buffered_s``) and until the fsync did (``fsync_s``). ``writeback``:
    start the disk's writeback of every ``writeback_bytes()`` as they are written, as cairn's
    writer does (``start_writeback``)."""
    from cairn.checkpoint.fsio import start_writeback, writeback_bytes

    every = writeback_bytes() if writeback else 0
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view, left, written, started = memoryview(block), nbytes, 0, 0
        while left > 0:
            n = os.write(fd, view[:min(left, len(block))])
            left, written = left - n, written + n
            if every and written - started >= every:
                start_writeback(fd, started, written - started)
                started = written
        buffered = time.perf_counter() - start
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"buffered_s": buffered, "fsync_s": time.perf_counter() - start}


def read_file(path: Path) -> float:
    """Seconds to read ``path`` sequentially, unbuffered."""
    start = time.perf_counter()
    buffer = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass
    return time.perf_counter() - start
