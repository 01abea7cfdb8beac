"""Runs of the real entry point (``python -m torch.distributed.run -m cairn.train``) in subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class RunResult:
    returncode: int
    output: str
    dump_folder: Path

    @property
    def records(self) -> list[dict]:
        path = self.dump_folder / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    @property
    def losses(self) -> dict[int, float]:
        """step -> loss of the step records (the last record of a step wins)."""
        return {r["step"]: r["loss"] for r in self.records if "loss" in r}

    @property
    def checkpoint_folder(self) -> Path:
        return self.dump_folder / "checkpoint"


def _command(dump_folder: Path, args: tuple[str, ...], nproc: int, config: str,
             torchrun_args: tuple[str, ...] = (), module: str = "llama3") -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *torchrun_args]
    if not any(a.startswith("--nnodes") for a in torchrun_args):
        cmd.append("--standalone")
    return cmd + ["-m", "cairn.train", "--module", module, "--config", config,
                  "--job.dump_folder", str(dump_folder), *args]


def _environment(env: dict | None) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}


def train(dump_folder: Path, *args: str, nproc: int = 1, config: str = "llama3_tiny", env: dict | None = None,
          check: bool = True, timeout: int = 600, torchrun_args: tuple[str, ...] = (),
          module: str = "llama3") -> RunResult:
    proc = subprocess.run(_command(dump_folder, args, nproc, config, torchrun_args, module), cwd=REPO,
                          env=_environment(env), capture_output=True, text=True, timeout=timeout)
    result = RunResult(proc.returncode, proc.stdout + proc.stderr, Path(dump_folder))
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{result.output[-6000:]}")
    return result


def start(dump_folder: Path, *args: str, nproc: int = 1, config: str = "llama3_tiny",
          env: dict | None = None) -> subprocess.Popen:
    """``train`` in the background: the torchrun process, its output (stdout and stderr) on a pipe."""
    return subprocess.Popen(_command(dump_folder, args, nproc, config), cwd=REPO, env=_environment(env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def kill_tree(process: subprocess.Popen) -> str:
    """SIGKILL torchrun's workers (and their writer processes), then torchrun: a crash of every
    rank; returns what they printed."""
    import contextlib
    import signal

    import psutil

    for child in psutil.Process(process.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            os.kill(child.pid, signal.SIGKILL)
    process.kill()
    return process.communicate()[0]


@pytest.fixture
def run_train():
    return train
