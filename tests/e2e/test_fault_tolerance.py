"""torchrun --max-restarts: a rank killed mid-training restarts the job from the newest committed step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, RunResult, train

pytestmark = pytest.mark.slow

COMMON = ["--checkpoint.enable", "--checkpoint.no-last_save_model_only", "--checkpoint.interval", "4",
          "--training.steps", "14", "--parallelism.data_parallel_shard_degree", "2",
          "--training.local_batch_size", "2", "--checkpoint.async_mode", "async_with_pinned_mem",
          # saves wait for the one before (torchtitan's way), so steps 4 and 8 are committed when a
          # rank is killed after step 9 (deferred saves would land later on this fast CPU model)
          "--checkpoint.when_busy", "wait"]


def _last_step(metrics_path) -> int:
    if not metrics_path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in metrics_path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def test_killed_rank_restarts_and_resumes_from_newest_step(tmp_path):
    reference = train(tmp_path / "ref", *COMMON, nproc=2)

    dump = tmp_path / "ft"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", "-m", "cairn.train", "--module", "llama3", "--config", "llama3_tiny",
           "--job.dump_folder", str(dump), *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # A slow step leaves time to kill a rank between the step-8 save and the end.
    launcher = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while _last_step(dump / "metrics.jsonl") < 9 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert launcher.poll() is None, "training ended before a rank could be killed"
        workers = [p for p in psutil.Process(launcher.pid).children(recursive=True) if "cairn.train" in
                   " ".join(p.cmdline())]
        assert len(workers) == 2
        os.kill(workers[1].pid, signal.SIGKILL)
        output, _ = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    if launcher.returncode != 0:
        (tmp_path / "ft.log").write_text(output)
    assert launcher.returncode == 0, output[-4000:]
    assert "loaded full checkpoint" in output  # the restarted workers resumed
    resumed = RunResult(0, output, dump)
    assert max(resumed.losses) == 14
    for step in range(1, 15):
        assert resumed.losses[step] == reference.losses[step], step  # bit-exact after the restart


MEMORY = ["--checkpoint.enable", "--checkpoint.interval", "1000", "--checkpoint.memory_interval", "2",
          "--training.steps", "14", "--parallelism.data_parallel_shard_degree", "2", "--training.local_batch_size", "2"]


def test_a_killed_worker_comes_back_from_memory_by_itself(tmp_path):
    """run_train.sh with MAX_RESTARTS=1 on 2 gloo ranks and snapshots every K=2 steps: rank 1's
    worker SIGKILLed after step 9; torchrun restarts the workers, which restore from host memory
    (no disk step exists), bit for bit, losing at most K steps; each start logs where its time
    went (a ``startup`` record, the restart's with restart_count 1)."""
    reference = train(tmp_path / "ref", *MEMORY, "--checkpoint.memory_dir", str(tmp_path / "ref-shm"), nproc=2)
    dump = tmp_path / "run"
    env = {**os.environ, "NGPU": "2", "MAX_RESTARTS": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [str(REPO / "run_train.sh"), "--config", "llama3_tiny", "--job.dump_folder", str(dump), *MEMORY,
               "--checkpoint.memory_dir", str(tmp_path / "shm")]
    launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    try:
        deadline = time.monotonic() + 300
        while _last_step(dump / "metrics.jsonl") < 9 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert launcher.poll() is None, "training ended before a rank could be killed"
        workers = sorted((p for p in psutil.Process(launcher.pid).children(recursive=True)
                          if "cairn.train" in " ".join(p.cmdline()) and "writer_process" not in " ".join(p.cmdline())),
                         key=lambda p: p.create_time())
        assert len(workers) == 2
        trained = _last_step(dump / "metrics.jsonl")
        os.kill(workers[1].pid, signal.SIGKILL)
        output, _ = launcher.communicate(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, output[-4000:]
    records = RunResult(0, output, dump).records
    [load] = [r for r in records if r.get("event") == "checkpoint_load"]
    assert load["tier"] == "memory" and 0 <= trained - load["from_step"] <= 2, load
    startups = [r for r in records if r.get("event") == "startup"]
    assert [r["restart_count"] for r in startups] == [0, 1]
    assert {"imports", "distributed", "model", "checkpointer", "resume", "first_step"} <= set(startups[1]["phases_s"])
    assert startups[1]["step"] == load["from_step"] + 1
    losses = RunResult(0, output, dump).losses
    for step in range(1, 15):
        assert losses[step] == reference.losses[step], step  # bit-exact, before and after the restart
