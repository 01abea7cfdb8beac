"""A real, small tmpfs for the tests of a full disk (``small_tmpfs`` fixture factory)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest


def small_tmpfs_mounter() -> Iterator[Callable[[Path, str], Path]]:
    """Yields ``mount(path, size)``: a tmpfs of ``size`` (e.g. "3m") at ``path``, unmounted at the
    end; the test is skipped where the machine does not allow mounting one (root in a container
    that permits it)."""
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        try:
            result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                    capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            result = None
        if result is None or result.returncode != 0:
            pytest.skip("cannot mount a tmpfs here")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)
