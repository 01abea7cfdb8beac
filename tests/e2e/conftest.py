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


def train(dump_folder: Path, *args: str, nproc: int = 1, config: str = "llama3_tiny", env: dict | None = None,
          check: bool = True, timeout: int = 600, torchrun_args: tuple[str, ...] = (),
          module: str = "llama3") -> RunResult:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *torchrun_args]
    if not any(a.startswith("--nnodes") for a in torchrun_args):
        cmd.append("--standalone")
    cmd += ["-m", "cairn.train", "--module", module, "--config", config,
            "--job.dump_folder", str(dump_folder), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    result = RunResult(proc.returncode, proc.stdout + proc.stderr, Path(dump_folder))
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{result.output[-6000:]}")
    return result


@pytest.fixture
def run_train():
    return train
