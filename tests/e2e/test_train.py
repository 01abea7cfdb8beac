"""The platform end to end: run_train.sh, every parallel layout on gloo, multi-node, errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, RunResult, train

pytestmark = pytest.mark.slow

# One global batch of 8 sequences, split differently by each layout.
LAYOUTS = {
    "dp_shard4": ["--parallelism.data_parallel_shard_degree", "4", "--training.local_batch_size", "2"],
    "hsdp2x2": ["--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "2",
                "--training.local_batch_size", "2"],
    "dp2_tp2": ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2",
                "--training.local_batch_size", "4"],
    "pp2_dp2": ["--parallelism.pipeline_parallel_degree", "2", "--parallelism.data_parallel_shard_degree", "2",
                "--training.local_batch_size", "4"],
}


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    return train(tmp_path_factory.mktemp("single"), "--training.steps", "3", "--training.local_batch_size", "8")


def test_run_train_sh_without_arguments_trains_and_loss_falls(tmp_path):
    """The README's first command, as a new user types it (outputs land in the working directory)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(REPO / "run_train.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = RunResult(0, proc.stdout + proc.stderr, tmp_path / "outputs")
    losses = result.losses
    assert len(losses) == 50
    first = sum(losses[s] for s in range(1, 6)) / 5
    last = sum(losses[s] for s in range(46, 51)) / 5
    assert last < first - 1.0, (first, last)
    assert (tmp_path / "outputs" / "tb").is_dir()
    logged = [line for line in proc.stderr.splitlines() if " INFO " in line]
    assert logged and all(line.startswith("[rank0]: ") and line.count("[rank") == 1 for line in logged), logged[:3]
    record = result.records[-1]
    for key in ("loss", "tokens_per_second", "step_time_ms", "memory_gib", "lr", "grad_norm"):
        assert key in record


def run_train_sh(tmp_path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return subprocess.run([str(REPO / "run_train.sh"), "--job.dump_folder", str(tmp_path), *flags], cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True, text=True,
                          timeout=900)


def test_run_train_sh_ends_a_failed_run_with_cairn_s_line(tmp_path):
    """A user error is the last thing on screen, torchrun's report in a file it names; a crash
    (a rank killed) keeps torchrun's whole report on screen."""
    missing = run_train_sh(tmp_path, "--checkpoint.enable", "--checkpoint.load_step", "7", "--training.steps", "2")
    assert missing.returncode == 2, missing.stderr[-3000:]
    lines = missing.stderr.rstrip().splitlines()
    assert lines[-1] == f"cairn.train: --checkpoint.load_step=7 not found: committed steps in {tmp_path}/checkpoint: none"
    assert "ChildFailedError" not in missing.stderr and "Traceback" not in missing.stderr
    report = lines[-2].split("torchrun's report: ")[1].split()[0]
    assert lines[-2].startswith("torchrun: rank 0 stopped with exit code 2")
    assert "exitcode  : 2" in Path(report).read_text() and "cairn.train FAILED" in Path(report).read_text()

    bad_flag = run_train_sh(tmp_path, "--checkpoint.interval", "0")
    assert bad_flag.returncode == 2
    assert bad_flag.stderr.rstrip().splitlines()[-2:] == [
        "cairn.train: invalid configuration (1 problem):", "  - --checkpoint.interval must be >= 1 (got 0)"]

    crashed = run_train_sh(tmp_path / "crash", "--checkpoint.enable", "--checkpoint.interval", "2",
                           "--training.steps", "3", env={"CAIRN_FAULT": "mid_data"})
    assert crashed.returncode == 1
    assert "ChildFailedError" in crashed.stderr and "Signal 9 (SIGKILL)" in crashed.stderr
    assert "torchrun: rank" not in crashed.stderr


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layout_first_step_loss_matches_single_process(layout, tmp_path, single_process_run):
    result = train(tmp_path, "--training.steps", "3", *LAYOUTS[layout], nproc=4)
    reference = single_process_run.losses
    for step in (1, 2, 3):
        assert result.losses[step] == pytest.approx(reference[step], rel=2e-5, abs=2e-5), (layout, step)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_torchrun_on_localhost(tmp_path, single_process_run):
    """torchrun --nnodes 2: two node ranks on 127.0.0.1, one process each, FSDP across the nodes."""
    port = str(_free_port())
    common = ["--nnodes", "2", "--master_addr", "127.0.0.1", "--master_port", port]
    cmd = lambda node: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", *common,
                        "--node_rank", str(node), "-m", "cairn.train", "--module", "llama3", "--config",
                        "llama3_tiny", "--job.dump_folder", str(tmp_path), "--training.steps", "3",
                        "--training.local_batch_size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd(node), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for node in (0, 1)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    losses = RunResult(0, "", tmp_path).losses
    assert losses[1] == pytest.approx(single_process_run.losses[1], rel=2e-5)


@pytest.mark.parametrize("args,needles", [
    (["--parallelism.tensor_parallel_degree", "3"], ["--parallelism.tensor_parallel_degree", "world size 4"]),
    (["--parallelism.data_parallel_shard_degree", "3"], ["data_parallel_shard_degree (3)"]),
    (["--training.global_batch_size", "6", "--training.local_batch_size", "4"], ["--training.global_batch_size"]),
])
def test_inconsistent_degrees_fail_with_one_clear_error(tmp_path, args, needles):
    result = train(tmp_path, "--training.steps", "1", *args, nproc=4, check=False)
    assert result.returncode != 0
    for needle in needles:
        assert needle in result.output, result.output[-3000:]
    assert "Traceback" not in result.output.split("cairn.train:")[-1][:200]
