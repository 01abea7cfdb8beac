"""Async saves through AsyncSaver: host staging arenas and the writer process.

Real DCP saves into LocalStore (single process), written by the real child process;
the GPU side (pinned arenas, the stream gate, device snapshots) is exercised by
benchmarks/gpu_train_check.sh and the benchmark on GPU hosts.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from cairn.checkpoint.staging import AsyncSaver, HostStager, snapshot_fits
from cairn.checkpoint.errors import CheckpointError, find_checkpoint_error
from cairn.checkpoint.faults import FAULT_ENV
from cairn.checkpoint.local import LocalStore
from test_storage import assert_same, folder_names, load, make_state, save

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DCP warns that no process group exists


@pytest.fixture
def storage(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "checkpoint")


def submit(saver: AsyncSaver, storage: LocalStore, step: int, state: dict):
    writer = storage.writer(step, {"kind": "full"})
    if saver.writer_process is not None:
        writer.delegate = saver.write_data
    saver.submit(step, state, lambda staged: dcp.save(staged, storage_writer=writer, no_dist=True))
    return writer


def data_checksums(storage: LocalStore, step: int) -> dict:
    files = storage.read_manifest(storage.step_dir(step))["files"]
    return {name: record["checksum"] for name, record in files.items() if name.endswith(".distcp")}


@pytest.fixture
def saver():
    made = []

    def make(**kwargs) -> AsyncSaver:
        made.append(AsyncSaver(**kwargs))
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_writer_process_writes_what_a_local_save_writes(storage, saver):
    s = saver(reuse_buffers=True)
    assert s.writer_process is not None  # Linux: the default writes in a child process
    state = make_state(3)
    submit(s, storage, 3, state)
    s.wait_for_staging()
    s.wait()
    assert {"queued", "gate", "staged", "data_start", "data_done", "done"} <= s.timeline.keys()
    dcp.save(make_state(3), storage_writer=storage.writer(4, {"kind": "full"}), no_dist=True)  # by this process
    assert data_checksums(storage, 3) == data_checksums(storage, 4)  # byte for byte
    assert_same(load(storage, 3), state)
    assert storage.verify(storage.step_dir(3)) == []


def test_pinned_mode_keeps_one_arena_and_one_writer(storage, saver):
    s = saver(reuse_buffers=True)
    s.prepare(make_state(1))  # what the manager does after the first training step
    s.wait()
    assert s.stager.allocations == 1 and s.prepare_seconds is not None
    pid = s.writer_process.pid
    for step in (1, 2, 3):
        submit(s, storage, step, make_state(step))
        s.wait()
    assert s.stager.allocations == 1 and s.stager.arena is not None
    assert s.writer_process.pid == pid and s.writer_process.starts == 1
    for step in (1, 2, 3):
        assert_same(load(storage, step), make_state(step))
    bigger = make_state(4)
    bigger["norm.weight"] = torch.rand(32)
    submit(s, storage, 4, bigger)  # another layout: a new arena, the old one released
    s.wait()
    assert s.stager.allocations == 2
    template = make_state(0)
    template["norm.weight"] = torch.zeros(32)
    storage.load(template, storage.step_dir(4), verify=True, no_dist=True)
    assert_same(template, bigger)


def test_async_mode_returns_the_arena_after_each_save(storage, saver):
    s = saver(reuse_buffers=False)
    for step in (1, 2):
        submit(s, storage, step, make_state(step))
        s.wait()
        assert s.stager.arena is None and s.stager.retained_bytes == 0
    assert s.stager.allocations == 2
    assert_same(load(storage, 2), make_state(2))


@pytest.mark.parametrize("writer", ["process", "thread"])
def test_state_may_change_once_staging_is_waited_for(storage, saver, writer):
    s = saver(reuse_buffers=True, writer=writer)
    state = make_state(5)
    expected = make_state(5)
    submit(s, storage, 5, state)
    s.wait_for_staging()  # what the trainer does before the optimizer step
    state["tok_embeddings.weight"].add_(1.0)
    state["optimizer"]["state"]["norm.weight"]["exp_avg"].zero_()
    s.wait()
    assert_same(load(storage, 5), expected)


def test_writer_process_dying_fails_the_save_and_the_next_one_restarts_it(storage, saver, monkeypatch):
    saved = save(storage, 1)
    monkeypatch.setenv(FAULT_ENV, "mid_data:exit")  # inherited by the writer process only at its start
    s = saver(reuse_buffers=True)
    monkeypatch.delenv(FAULT_ENV)
    submit(s, storage, 2, make_state(2))
    with pytest.raises(BaseException) as raised:  # DCP wraps a rank's error in its CheckpointException
        s.wait()
    error = find_checkpoint_error(raised.value)
    assert isinstance(error, CheckpointError)
    message = str(error)
    assert "writer process" in message and "exited with code 99" in message and "step 2" in message
    assert "untouched" in message
    assert storage.committed_steps() == [1]
    assert_same(load(storage, 1), saved)
    submit(s, storage, 3, make_state(3))  # a fresh writer process
    s.wait()
    assert s.writer_process.starts == 2
    assert storage.committed_steps() == [1, 3]
    assert_same(load(storage, 3), make_state(3))
    storage.cleanup_incomplete()
    assert folder_names(storage) == ["step-1", "step-3"]


def test_disk_full_in_the_writer_process_is_reported_with_the_step(storage, saver, monkeypatch):
    saved = save(storage, 1)
    monkeypatch.setenv(FAULT_ENV, "mid_data:enospc")
    s = saver(reuse_buffers=True)
    monkeypatch.delenv(FAULT_ENV)
    writer = submit(s, storage, 2, make_state(2))
    with pytest.raises(BaseException) as raised:
        s.wait()
    assert "disk full" in str(raised.value) and "step 2" in str(raised.value)
    assert writer.last_error is not None and "disk full" in str(writer.last_error)
    assert storage.committed_steps() == [1]
    assert_same(load(storage, 1), saved)


def test_writer_process_exits_with_the_saver(storage, saver):
    s = saver(reuse_buffers=True)
    process = s.writer_process._proc
    submit(s, storage, 1, make_state(1))
    s.close()
    assert process.poll() == 0


def test_staged_dtensors_keep_their_layout_and_host_buffers(monkeypatch):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29400 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        sharded = distribute_tensor(torch.randn(8, 4), init_device_mesh("cpu", (1,)), [Shard(0)])
        s = AsyncSaver(reuse_buffers=True, writer="thread")
        staged = s.stager.stage({"w": sharded})["w"]
        assert isinstance(staged, DTensor) and staged.placements == sharded.placements
        assert staged.shape == sharded.shape and torch.equal(staged.to_local(), sharded.to_local())
        # the staged shard is the host buffer itself, not a copy of it on some device
        assert staged.to_local().device.type == "cpu"
        assert staged.to_local().data_ptr() == s.stager._buffers["w/"].data_ptr()
        s.close()
    finally:
        dist.destroy_process_group()


GB = 10**9


@pytest.mark.parametrize("needed,free,total,fits", [
    (16 * GB, 55 * GB, 80 * GB, True),     # 1B on an 80 GB H100: 8 GB to spare is kept
    (48 * GB, 60 * GB, 143 * GB, False),   # 14.3 GB must stay free: 62.3 > 60
    (48 * GB, 68 * GB, 143 * GB, True),
    (10 * GB, 14 * GB, 16 * GB, False),    # on a small device the spare is 4 GiB, more than 4 GB
    (10 * GB, 14 * GB + 2**30, 16 * GB, True),
])
def test_auto_snapshot_needs_the_shard_and_a_tenth_of_the_device_free(needed, free, total, fits):
    assert snapshot_fits(needed, free, total) is fits


def test_snapshot_settings():
    # without CUDA there is no device to snapshot, whatever the setting
    for setting in ("auto", "on", "off", True, False):
        stager = HostStager(reuse=True, pin_memory=True, device_snapshot=setting)
        expected = "off" if not torch.cuda.is_available() else {True: "on", False: "off"}.get(setting, setting)
        assert stager.snapshot_mode == expected and stager.device_snapshot == (expected == "on")
    # auto needs kept buffers: fresh host copies per save would take a fresh device copy too
    assert HostStager(reuse=False, pin_memory=False, device_snapshot="auto").snapshot_mode == "off"
    with pytest.raises(ValueError, match="auto, on or off"):
        HostStager(reuse=True, pin_memory=True, device_snapshot="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("pin", [True, False], ids=["pinned", "pageable"])
@pytest.mark.parametrize("snapshot", ["on", "off"])
def test_cuda_staging_is_exact_in_every_mode(monkeypatch, pin, snapshot):
    """Device state to host buffers, pinned or pageable (through pinned pieces), with and without a
    device snapshot, in pieces smaller than the tensors: every byte arrives, and the state may
    change once the gate has passed."""
    from cairn.checkpoint import staging

    monkeypatch.setattr(staging, "PIECE", 1 << 16)
    device = torch.device("cuda", torch.cuda.current_device())
    state = {"w": torch.randn(300, 257, device=device), "b": torch.randn(1000, device=device).to(torch.bfloat16),
             "step": torch.tensor(7.0, device=device), "mask": torch.rand(99, device=device) > 0.5,
             "empty": torch.empty(0, 3, device=device), "meta": {"position": 3}}
    expected = {key: value.cpu().clone() for key, value in state.items() if isinstance(value, torch.Tensor)}
    stager = HostStager(reuse=True, pin_memory=pin, device_snapshot=snapshot)
    for round_ in range(2):
        ready = stager.ready_marker()
        staged, gate, drain = stager.enqueue(state, ready)
        if gate is not None:
            torch.cuda.current_stream().wait_event(gate)
        for value in state.values():  # the training step changes the state once the gate allows
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value.add_(1.0)
        drain()
        for key, value in expected.items():
            assert staged[key].device.type == "cpu" and torch.equal(staged[key], value), (key, round_)
        assert staged["meta"] == {"position": 3}
        expected = {key: value.cpu().clone() for key, value in state.items() if isinstance(value, torch.Tensor)}
    assert stager.allocations == 1
    assert (stager.arena.pinned if stager.arena is not None else False) == pin
    stager.release()
