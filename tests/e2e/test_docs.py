"""docs/checkpoint.md runs as written: every shell block marked runnable, in order.

A block is runnable when the line before its opening fence is ``<!-- test -->`` (an HTML
comment, invisible in the rendered page). The blocks run one after another, each with
``bash -euo pipefail``, in one scratch directory that looks like the repository root to
the commands (``./run_train.sh``, ``./scripts``, ``./assets``, ``./train_configs`` are
links into the checkout), so what one section writes under ``./outputs`` is there for the
next, as for a reader following the guide. ``cairn`` and ``python`` on the PATH are this
interpreter's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

GUIDE = REPO / "docs" / "checkpoint.md"
RUNNABLE = "<!-- test -->"
LINKED = ("run_train.sh", "scripts", "assets", "train_configs")
# A block with a placeholder like <input_dir> is a template to fill in, not a command to run.
PLACEHOLDER = re.compile(r"<[a-z_]+>")


def bash_blocks(text: str) -> list[tuple[int, bool, str]]:
    """(line number of the fence, runnable?, code) for every ```bash block."""
    lines = text.splitlines()
    blocks = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start = i
            previous = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            blocks.append((start + 1, previous == RUNNABLE, "\n".join(body) + "\n"))
        i += 1
    return blocks


def make_sandbox(root: Path) -> tuple[Path, dict[str, str]]:
    work = root / "work"
    work.mkdir()
    for name in LINKED:
        (work / name).symlink_to(REPO / name)
    bin_dir = root / "bin"
    bin_dir.mkdir()
    # Scripts, not links: a venv's python finds its packages only when started by its own path.
    for name, command in (("python", f'"{sys.executable}"'), ("cairn", f'"{sys.executable}" -m cairn')):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "CAIRN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("NGPU", None)
    return work, env


def test_bash_blocks_are_runnable_or_templates():
    blocks = bash_blocks(GUIDE.read_text())
    assert sum(runnable for _, runnable, _ in blocks) >= 15
    for line, runnable, code in blocks:
        assert runnable or PLACEHOLDER.search(code), (
            f"docs/checkpoint.md:{line}: a ```bash block without placeholders should be marked {RUNNABLE}")


def test_guide_commands_run_as_written(tmp_path):
    work, env = make_sandbox(tmp_path)
    timings = []
    for line, runnable, code in bash_blocks(GUIDE.read_text()):
        if not runnable:
            continue
        start = time.perf_counter()
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=work, env=env, capture_output=True,
                              text=True, timeout=600)
        timings.append((line, time.perf_counter() - start))
        assert proc.returncode == 0, (
            f"docs/checkpoint.md:{line}: exit status {proc.returncode}\n--- block\n{code}--- output (tail)\n"
            f"{(proc.stdout + proc.stderr)[-5000:]}")
    print("seconds per block (line: s):", ", ".join(f"{line}: {s:.1f}" for line, s in timings))
    # What the guide promises it leaves behind.
    assert (work / "resume.png").stat().st_size > 10_000
    assert (work / "checkpoint.pt").is_file() and (work / "streamed.pt").is_file()
    assert (work / "outputs" / "hf" / "checkpoint" / "step-4" / "config.json").is_file()
