"""Recovery at the hardware's speed, the parts a CPU can check: a disk save writes the memory
snapshot of its step (one host copy), a writer process that dies costs one save and not the run,
a snapshot's reported cost is what the next step's time shows, copies are cut where the arena's
pinned pieces end, the restore's parallel check finds a flipped byte in any chunk, and a crashed
save's leftovers are removed off the path to the first step."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from cairn.checkpoint import load
from cairn.checkpoint import memory_slots
from cairn.checkpoint import staging
from cairn.checkpoint.faults import FAULT_ENV
from cairn.checkpoint.local import LocalStore
from cairn.checkpoint.memory_slots import list_snapshots
from test_memory import build as build_manager


def build(tmp_path, **overrides):
    """test_memory's manager on a wider model, the memory tier off unless asked for."""
    return build_manager(tmp_path, width=64, **{"memory_interval": 0, **overrides})


def step_once(model, optimizer, counter, manager, pause_s: float = 0.0):
    counter.step += 1
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(counter.step))
    model(x).pow(2).mean().backward()
    manager.maybe_wait_for_staging()
    optimizer.step()
    optimizer.zero_grad()
    time.sleep(pause_s)
    return manager.save(counter.step)


def model_state(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_a_disk_save_writes_the_memory_snapshot_of_its_step(tmp_path):
    """With the memory tier and async saves, a disk save due at a step that is no snapshot step
    takes a snapshot there and writes its host copy: three slots, the save's step among the
    snapshots, and the step on disk is the state trained to that step, bit for bit."""
    model, optimizer, counter, manager = build(tmp_path, interval=3, memory_interval=2,
                                               async_mode="async_with_pinned_mem", when_busy="wait")
    assert len(manager.memory.own) == 3
    expected, reports = {}, []
    for _ in range(7):
        reports.append(step_once(model, optimizer, counter, manager))
        expected[counter.step] = model_state(model)
        manager.memory.wait()
    manager.close()
    assert manager.async_saver is None
    snapshots = {row["step"] for row in list_snapshots(tmp_path / "shm") if row["committed"]}
    assert 6 in snapshots and snapshots <= {2, 3, 4, 6}
    # the snapshot of a save's step is reported one step later, as taken with the save
    memory_records = [result.memory for result in reports if result.memory is not None]
    assert any(r["step"] == 3 and r.get("with_save") for r in memory_records), memory_records
    store = LocalStore(tmp_path / "checkpoint")
    assert store.committed_steps() == [3, 6]
    for step in (3, 6):
        state = {key: torch.zeros_like(value) for key, value in expected[step].items()}
        assert load(state, store, step).step == step
        for key, value in expected[step].items():
            assert torch.equal(state[key], value), (step, key)


def test_a_dead_writer_process_loses_one_save_and_training_goes_on(tmp_path, monkeypatch):
    """The writer process of an async save SIGKILLed while it writes step 2: that save is lost
    (logged, returned, counted), training goes on, and step 4's save starts a new writer."""
    monkeypatch.setenv(FAULT_ENV, "mid_data:sleep=30")  # the first writer process is slow to write
    model, optimizer, counter, manager = build(tmp_path, interval=2, async_mode="async_with_pinned_mem",
                                               when_busy="wait")
    monkeypatch.delenv(FAULT_ENV)
    step_once(model, optimizer, counter, manager)
    step_once(model, optimizer, counter, manager)  # step 2's save is being written
    writer = manager.async_saver.saver.writer_process
    deadline = time.monotonic() + 60
    while not list((tmp_path / "checkpoint").glob(".tmp-step-2/*.distcp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
    step_once(model, optimizer, counter, manager)
    info = step_once(model, optimizer, counter, manager)  # step 4: collects step 2's loss, then saves
    assert [lost["step"] for lost in info.lost_saves] == [2]
    assert "killed by signal 9" in info.lost_saves[0]["why"]
    manager.close()
    assert manager.saves_lost[0]["step"] == 2 and len(manager.saves_lost) == 1
    assert writer.starts == 2
    assert LocalStore(tmp_path / "checkpoint").committed_steps() == [4]


def test_a_snapshots_reported_cost_is_what_the_next_step_shows(tmp_path):
    """The memory_snapshot record comes with the step after the snapshot, and its stall_s is how
    much longer that step took than the plain steps before it."""
    model, optimizer, counter, manager = build(tmp_path, memory_interval=4)
    records = []
    for _ in range(9):
        slow = counter.step in (4, 8)  # the step after each snapshot is 0.3 s slower
        result = step_once(model, optimizer, counter, manager, pause_s=0.35 if slow else 0.05)
        if result.memory is not None:
            records.append(result.memory)
        manager.memory.wait()
    manager.close()
    assert [r["step"] for r in records] == [4, 8]
    for record in records:
        assert record["kind"] == "memory" and 0.2 < record["stall_s"] < 1.0, record
        assert record["step_time_s"] > record["typical_step_s"] + 0.2


def test_copies_are_cut_where_the_arenas_pinned_pieces_end(monkeypatch):
    """Every copy between device and arena lies inside one PIECE of the arena (CUDA refuses a
    copy that spans two registrations), the pieces cover every byte in the arena's order, and
    the ring of pinned buffers lands them all."""
    monkeypatch.setattr(staging, "PIECE", 1 << 13)
    state = {"a": torch.randn(3000), "b": torch.arange(5000, dtype=torch.int16), "c": torch.rand(7) > 0.5,
             "d": torch.empty(0), "e": torch.randn(17, 33).to(torch.bfloat16)}
    stager = staging.HostStager(reuse=True, pin_memory=False)
    stager.prepare(state)
    pieces = stager._pieces({f"{key}/": value for key, value in state.items()})
    ends = []
    for source, target in pieces:
        start = target.data_ptr() - stager.arena.base_ptr
        end = start + target.numel()
        assert start // staging.PIECE == (end - 1) // staging.PIECE, (start, end)
        ends.append(end)
        target.copy_(source)
    assert ends == sorted(ends)
    for key, value in state.items():
        assert torch.equal(stager._buffers[f"{key}/"], value), key
    # the same pieces through the ring of pinned buffers and its copier threads (a pageable
    # arena's drain): every byte lands, and progress is reported in the arena's order
    changed = {key: (value + 1 if value.dtype != torch.bool else ~value) for key, value in state.items()}
    done = []
    stager._copy_through_ring(stager._pieces({f"{key}/": value for key, value in changed.items()}), done.append)
    assert done == sorted(done) and done[-1] == ends[-1] and len(done) == len(pieces)
    for key, value in changed.items():
        assert torch.equal(stager._buffers[f"{key}/"], value), key
    stager.release()


@pytest.mark.parametrize("chunk", [0, 3, -1], ids=["first", "middle", "last"])
def test_the_restores_parallel_check_finds_a_flipped_byte_in_any_chunk(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(memory_slots, "CHUNK", 1 << 12)
    model, optimizer, counter, manager = build(tmp_path, memory_interval=2)
    for _ in range(2):
        step_once(model, optimizer, counter, manager)
        manager.memory.wait()
    manager.close()
    [row] = [r for r in list_snapshots(tmp_path / "shm") if r["committed"]]
    data = tmp_path / "shm" / "rank-0" / row["slot"] / "data.bin"
    chunks = -(-row["bytes"] // (1 << 12))
    assert chunks >= 5
    index = chunk % chunks
    where = index * (1 << 12) + min(17, row["bytes"] - index * (1 << 12) - 1)
    with open(data, "r+b") as f:
        f.seek(where)
        byte = f.read(1)
        f.seek(where)
        f.write(bytes([byte[0] ^ 0x40]))
    model, optimizer, counter, manager = build(tmp_path, memory_interval=2)
    before = model_state(model)
    assert not manager.load()  # no older snapshot, no disk step: a fresh start
    assert counter.step == 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # nothing of the bad snapshot reached the model
    manager.close()


def test_a_crashed_saves_leftovers_are_removed_off_the_path_to_the_first_step(tmp_path, monkeypatch):
    """A manager's start renames an unfinished save out of the way at once and deletes it on a
    thread: the start does not wait for the delete, a save of the same step right away is not
    disturbed, and the leftover is gone once the manager is closed."""
    from cairn.checkpoint import fsio

    leftover = tmp_path / "checkpoint" / ".tmp-step-2"
    leftover.mkdir(parents=True)
    (leftover / "__0_0.distcp").write_bytes(b"x" * 4096)
    remove_tree, release = fsio.remove_tree, threading.Event()

    def remove_tree_when_released(path):
        assert release.wait(60)
        return remove_tree(path)

    monkeypatch.setattr(fsio, "remove_tree", remove_tree_when_released)
    model, optimizer, counter, manager = build(tmp_path, interval=2)  # returns while the delete waits
    assert not leftover.exists()
    assert len(list((tmp_path / "checkpoint").glob(".trash-*"))) == 1
    step_once(model, optimizer, counter, manager)
    step_once(model, optimizer, counter, manager)
    assert LocalStore(tmp_path / "checkpoint").committed_steps() == [2]
    release.set()
    manager.close()
    assert not list((tmp_path / "checkpoint").glob(".trash-*"))
