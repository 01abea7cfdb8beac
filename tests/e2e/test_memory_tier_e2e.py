"""The memory tier in real runs: two torchrun node ranks on 127.0.0.1, 2 processes each, FSDP
over the 4 ranks, each node its own --checkpoint.memory_dir, replicas on.

Every process is SIGKILLed in the middle of a snapshot: the restart resumes from the previous
snapshot in memory, bit-exact. Then node 1 is lost (its folder wiped): the restart resumes from
the replicas node 0 keeps, bit-exact. A run that finishes removes its snapshots.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import REPO, RunResult, train

pytestmark = pytest.mark.slow

STEPS = 12
COMMON = ["--checkpoint.enable", "--checkpoint.no-last_save_model_only", "--checkpoint.interval", "100",
          "--checkpoint.memory_interval", "2", "--checkpoint.memory_replicas", "1",
          "--training.steps", str(STEPS), "--parallelism.data_parallel_shard_degree", "4",
          "--training.local_batch_size", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(dump, memory, *args: str, env: dict | None = None) -> list[subprocess.CompletedProcess]:
    """One run: torchrun node ranks 0 and 1 on 127.0.0.1, 2 processes each."""
    port = str(free_port())
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", port, "-m", "cairn.train",
               "--module", "llama3", "--config", "llama3_tiny", "--job.dump_folder", str(dump), *COMMON,
               "--checkpoint.memory_dir", str(memory / f"node{node}"), *args]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(subprocess.CompletedProcess(proc.args, proc.wait(timeout=600), proc.stdout.read(), ""))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outputs


def loads(dump) -> list[dict]:
    return [r for r in RunResult(0, "", dump).records if r.get("event") == "checkpoint_load"]


def test_killed_everywhere_then_a_node_lost(tmp_path):
    reference = two_nodes(tmp_path / "ref", tmp_path / "ref-shm")
    assert all(r.returncode == 0 for r in reference), reference[0].stdout[-4000:]
    expected = RunResult(0, "", tmp_path / "ref").losses
    assert max(expected) == STEPS
    assert not any((tmp_path / "ref-shm").glob("node*/rank-*"))  # a finished run removes its snapshots
    snapshots = [r for r in RunResult(0, "", tmp_path / "ref").records if r.get("event") == "memory_snapshot"]
    assert [r["step"] for r in snapshots] == list(range(2, STEPS, 2)) and all(r["bytes"] > 0 for r in snapshots)

    dump, memory = tmp_path / "run", tmp_path / "shm"
    # every process SIGKILLed in its 4th snapshot (step 8), after the copy, before the commit
    crashed = two_nodes(dump, memory, env={"CAIRN_FAULT": "during_snapshot", "CAIRN_FAULT_SKIP": "3"})
    assert all(r.returncode != 0 for r in crashed)
    assert "killing pid" in crashed[0].stdout
    assert not (dump / "checkpoint").exists() or not any((dump / "checkpoint").glob("step-*"))  # no disk step

    # restart on the same hosts: step 6 from memory; it stops cleanly after step 10 (snapshots kept)
    resumed = two_nodes(dump, memory, "--debug.exit_after_step", "10")
    assert all(r.returncode == 0 for r in resumed), resumed[0].stdout[-4000:]
    assert "restored step 6 from host memory in" in resumed[0].stdout
    first = loads(dump)[-1]
    assert first["tier"] == "memory" and first["from_step"] == 6 and first["steps_lost"] == 2
    losses = RunResult(0, "", dump).losses
    for step in range(7, 11):
        assert losses[step] == expected[step], step  # bit-exact after the restart

    # node 1 is lost and replaced by an empty host: its ranks restore from node 0's replicas
    shutil.rmtree(memory / "node1")
    final = two_nodes(dump, memory)
    assert all(r.returncode == 0 for r in final), final[0].stdout[-4000:]
    assert "restored step 10 from host memory and replicas" in final[0].stdout
    second = loads(dump)[-1]
    assert second["tier"] == "replica" and second["ranks_from_replicas"] == 2 and second["from_step"] == 10
    losses = RunResult(0, "", dump).losses
    for step in (11, 12):
        assert losses[step] == expected[step], step
    assert not any(memory.glob("node*/rank-*"))  # finished: removed
    assert json.loads((dump / "checkpoint" / "step-12" / "cairn_manifest.json").read_text())["step"] == 12


def test_a_new_run_given_the_same_memory_dir_starts_fresh(tmp_path):
    """The sweep's careless user: a run stopped after step 5 (snapshots of steps 2 and 4 kept),
    then a new run with another seed, an empty dump folder and the same --checkpoint.memory_dir:
    it trains from its own fresh weights from step 1, saying why each snapshot is not its own
    (tests/unit/test_hardening_memory.py checks those weights bitwise); a restart of that new
    run resumes its own."""
    memory = tmp_path / "shm"
    flags = ["--checkpoint.enable", "--training.steps", "8", "--checkpoint.memory_interval", "2",
             "--checkpoint.memory_dir", str(memory)]
    from cairn.checkpoint.memory_slots import list_snapshots

    train(tmp_path / "first", *flags, "--debug.exit_after_step", "5")
    theirs = [row["path"] for row in list_snapshots(memory) if row["committed"]]  # 2 and 4 (one if skipped)
    other = train(tmp_path / "second", *flags, "--debug.seed", "7", "--debug.exit_after_step", "3")
    unusable = [line for line in other.output.splitlines() if "is unusable: another run's" in line]
    assert theirs and len(unusable) == len(theirs) and "restored step" not in other.output, other.output[-3000:]
    assert str(tmp_path / "first" / "checkpoint") in unusable[0]  # names the folder it belongs to
    assert "starting from freshly initialized weights" in other.output and min(other.losses) == 1
    resumed = train(tmp_path / "second", *flags, "--debug.seed", "7")
    assert "restored step 2 from host memory" in resumed.output and "is unusable" not in resumed.output
