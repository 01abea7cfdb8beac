"""A real, small tmpfs for the tests of a full disk (``small_tmpfs`` fixture factory)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest


def small_tmpfs_mounter() -> Iterator[Callable[[Path, str], Path]]:
    """Yields ``mount(path, size, read_only=False)``: a tmpfs of ``size`` (e.g. "3m") at ``path``
    (read-only: even root cannot write there), unmounted at the end; the test is skipped where
    the machine does not allow mounting one (root in a container that permits it)."""
    mounted: list[Path] = []

    def mount(path: Path, size: str, read_only: bool = False) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size}" + (",ro" if read_only else "")
        try:
            result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
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
