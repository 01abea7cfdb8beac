"""Cold reads for the benchmarks: drop the page cache, or evict given files from it."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


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
