"""The memory tier through the library API, on one process: a training loop of its own with a
CheckpointManager snapshots every K steps; a new manager (a restarted process) resumes from the
snapshot when it is as new as the folder's newest step, bitwise, and from the folder when not;
a finished run removes its snapshots; too little room is one line naming the flag."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cairn.checkpoint import CheckpointManager, OptimizerState
from cairn.checkpoint.errors import CheckpointError
from cairn.checkpoint.memory import fill, skeleton
from cairn.checkpoint.memory_slots import list_snapshots
from tmpfs import small_tmpfs_mounter


class Counter:
    def __init__(self):
        self.step = 0

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


@pytest.fixture
def small_tmpfs():
    yield from small_tmpfs_mounter()


def build(tmp_path, width=16, memory_dir=None, **overrides):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    counter = Counter()
    settings = dict(enable=True, interval=100, keep_latest_k=0, last_save_model_only=False, memory_interval=2,
                    memory_dir=str(memory_dir or tmp_path / "shm"))
    config = CheckpointManager.Config(**{**settings, **overrides})
    manager = CheckpointManager(config, model_parts=model, states={"optimizer": OptimizerState(model, optimizer),
                                                                    "train_state": counter},
                                base_folder=tmp_path)
    return model, optimizer, counter, manager


def train(model, optimizer, counter, manager, until, total=100):
    losses = {}
    while counter.step < until:
        counter.step += 1
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(counter.step))  # the step's batch
        loss = model(x).pow(2).mean()
        loss.backward()
        manager.maybe_wait_for_staging()
        optimizer.step()
        optimizer.zero_grad()
        losses[counter.step] = loss.item()
        manager.save(counter.step, last_step=counter.step == total)
        if manager.memory is not None:
            manager.memory.wait()  # this loop outruns a snapshot: take every due one (a real one skips)
    return losses


def test_restart_resumes_from_memory_bitwise_then_disk_when_newer(tmp_path):
    model, optimizer, counter, manager = build(tmp_path)
    train(model, optimizer, counter, manager, 5)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    exp_avg = [optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    manager.close()  # not finished: the snapshots stay
    del model, optimizer, manager
    assert [s["step"] for s in list_snapshots(tmp_path / "shm")] == [4, 2]

    # restart: step 4 from memory, then step 5 again gives the same weights
    model, optimizer, counter, manager = build(tmp_path)
    assert manager.load()
    assert manager.last_load["tier"] == "memory" and manager.last_load["from_step"] == 4
    assert manager.last_load["steps_lost"] == 1 and counter.step == 4
    phases = manager.last_load["phases_s"]  # where the restore's time went, in metrics.jsonl too
    assert set(phases) == {"inventory", "replicas", "state", "load", "agree", "copy", "apply"}
    assert sum(phases.values()) <= manager.last_load["seconds"] + 1e-3
    train(model, optimizer, counter, manager, 5)
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    for p, want in zip(model.parameters(), exp_avg):
        assert torch.equal(optimizer.state[p]["exp_avg"], want)
    manager.save(5, last_step=False, stopping=True)
    manager.close()

    # a disk step newer than every snapshot (step 7 saved, the newest snapshot is step 6): the folder wins
    model, optimizer, counter, manager = build(tmp_path, interval=7)
    assert manager.load() and manager.last_load["from_step"] == 4  # the newest slot: untouched by the restart before it
    train(model, optimizer, counter, manager, 7)
    manager.close()
    assert [s["step"] for s in list_snapshots(tmp_path / "shm")] == [6, 4]
    model, optimizer, counter, manager = build(tmp_path, interval=7)
    assert manager.load() and manager.last_load["tier"] == "disk" and manager.last_load["from_step"] == 7
    manager.close()


def test_a_finished_run_removes_its_snapshots(tmp_path):
    model, optimizer, counter, manager = build(tmp_path)
    train(model, optimizer, counter, manager, 4, total=4)
    manager.close()
    assert not (tmp_path / "shm").exists()


def test_too_little_room_is_one_line_naming_the_flag(tmp_path, small_tmpfs):
    """A 1 MiB tmpfs cannot hold two slots of a 1.6 MB state: refused after the first step,
    before a snapshot could fill it mid-copy; nothing saved is touched."""
    shm = small_tmpfs(tmp_path / "small", "1m")
    model, optimizer, counter, manager = build(tmp_path, width=16384, memory_dir=shm / "cairn")
    with pytest.raises(CheckpointError, match="Config.memory_dir") as raised:
        train(model, optimizer, counter, manager, 1)
    assert "GB free" in str(raised.value) and str(shm) in str(raised.value)
    manager.close()


def test_skeleton_and_fill_name_what_differs():
    state = {"a": torch.ones(2), "b": {"lr": 0.1, "c": [torch.zeros(1), 3]}}
    plain = skeleton(state)
    assert plain["b"]["lr"] == 0.1 and plain["b"]["c"][1] == 3 and isinstance(plain["a"], str)
    assert fill(state, plain)["b"]["c"][0] is state["b"]["c"][0]
    with pytest.raises(KeyError, match="keys"):
        fill({**state, "extra": 1}, plain)
