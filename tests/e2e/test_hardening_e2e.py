"""Hardening as a user meets it: real training processes (1 and 2 ranks) on one folder, a killed
run's folder taken over, and bad input answered with one line naming the flag, file or cause."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from cairn.checkpoint.lease import lease_state
from cairn.checkpoint.store import open_store
from conftest import kill_tree, start, train

pytestmark = pytest.mark.slow

CKPT = ["--checkpoint.enable", "--checkpoint.interval", "4", "--checkpoint.no-last_save_model_only"]


def wait_for_step(dump: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    metrics = dump / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists() and any(json.loads(line).get("step", 0) >= step
                                    for line in metrics.read_text().splitlines() if line.strip()):
            return
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached")


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_second_run_on_a_busy_folder_refuses_and_the_first_is_untouched(tmp_path, nproc):
    layout = ["--parallelism.data_parallel_shard_degree", str(nproc), "--training.local_batch_size", "2"]
    first_dump, second_dump = tmp_path / "first", tmp_path / "second"
    folder = str(tmp_path / "shared_checkpoint")
    first = start(first_dump, *CKPT, *layout, "--checkpoint.folder", folder, "--training.steps", "400",
                  "--checkpoint.when_busy", "wait", nproc=nproc)
    try:
        wait_for_step(first_dump, 5, first)
        second = train(second_dump, *CKPT, *layout, "--checkpoint.folder", folder, "--training.steps", "8",
                       nproc=nproc, check=False, timeout=300)
        assert second.returncode != 0
        assert "is in use by another run" in second.output and "pid " in second.output
        assert "host " in second.output
        assert not [line for line in second.output.splitlines() if line.startswith("[rank") and "Traceback" in line]
        assert first.poll() is None  # the first run goes on
        lease = open_store(folder).lease_read()[0]
        assert lease["pid"] in {p.pid for p in psutil.Process(first.pid).children(recursive=True)}
    finally:
        kill_tree(first)
    # killed: its lease names a process that is gone; the next run takes the folder over, removes the
    # killed run's leftovers and resumes from its newest committed step
    third = train(tmp_path / "third", *CKPT, *layout, "--checkpoint.folder", folder, "--training.steps", "420",
                  "--debug.exit_after_step", "1", nproc=nproc, timeout=300, check=False)
    assert third.returncode == 0, third.output[-3000:]
    assert "took over the lease" in third.output and "is gone" in third.output
    assert "loaded full checkpoint" in third.output
    assert not list(Path(folder).glob(".tmp-step-*"))


def test_a_run_killed_mid_save_is_taken_over_at_once(tmp_path):
    dump = tmp_path / "run"
    run = start(dump, *CKPT, "--training.steps", "400", "--checkpoint.async_mode", "async_with_pinned_mem",
                "--checkpoint.when_busy", "wait")
    wait_for_step(dump, 9, run)
    kill_tree(run)
    resumed = train(dump, *CKPT, "--training.steps", "400", "--debug.exit_after_step", "13",
                    "--checkpoint.async_mode", "async_with_pinned_mem", timeout=300)
    assert "took over the lease" in resumed.output and "loaded full checkpoint" in resumed.output
    assert lease_state(open_store(dump / "checkpoint")) is None  # released at the clean stop


@pytest.mark.parametrize("mode", ["disabled", "async_with_pinned_mem"])
def test_a_full_disk_in_training_is_one_line(tmp_path, mode):
    result = train(tmp_path, *CKPT, "--training.steps", "6", "--checkpoint.async_mode", mode, check=False,
                   env={"CAIRN_FAULT": "mid_data:enospc"})
    assert result.returncode != 0
    lines = [line for line in result.output.splitlines() if "cairn.train:" in line]
    assert len(lines) == 1 and "disk full (" in lines[0] and "GB free of" in lines[0], result.output[-3000:]
    assert "--checkpoint.folder" in lines[0] and "inline_container" not in result.output
    assert "CheckpointException" not in result.output


@pytest.mark.parametrize("mode", ["disabled", "async"])
def test_a_read_only_folder_is_one_line_at_start(tmp_path, mode):
    """The checkpoint folder on a read-only filesystem (root cannot write there either): one line
    naming the flag before training, not a traceback from the lease's first write."""
    from tmpfs import small_tmpfs_mounter

    mounts = small_tmpfs_mounter()
    mount = next(mounts)
    try:
        mount(tmp_path / "checkpoint", "1m", read_only=True)
        result = train(tmp_path, "--checkpoint.enable", "--training.steps", "2", "--checkpoint.async_mode", mode,
                       check=False)
    finally:
        next(mounts, None)
    assert result.returncode != 0
    lines = [line for line in result.output.splitlines() if "cairn.train:" in line]
    assert len(lines) == 1 and "OSError" not in result.output and "[Errno" not in result.output, result.output[-3000:]
    assert f"--checkpoint.folder {tmp_path / 'checkpoint'} is not writable" in lines[0]
    assert "read-only filesystem" in lines[0]


def test_bad_paths_are_one_line(tmp_path):
    a_file = tmp_path / "weights.pt"
    a_file.write_bytes(b"not a folder")
    result = train(tmp_path / "a", "--checkpoint.enable", "--checkpoint.initial_load_path", str(a_file),
                   check=False)
    lines = [line for line in result.output.splitlines() if "cairn.train:" in line]
    assert result.returncode != 0 and len(lines) == 1 and "initial_load_path" in lines[0] and "is a file" in lines[0]
    assert "NotADirectoryError" not in result.output
    tokenizer = tmp_path / "tokenizer.json"
    tokenizer.write_text("not json")
    result = train(tmp_path / "b", "--model.tokenizer_path", str(tokenizer), check=False)
    assert result.returncode != 0 and "--model.tokenizer_path" in result.output
    assert "Traceback" not in "\n".join(line for line in result.output.splitlines() if "rank0" in line)
