"""cairn.checkpoint as a library: the manager built from tiny Stateful objects, the plain
functions, BackgroundSaver and CairnAsyncStager, with real DCP round trips on a 1-rank gloo group."""

from __future__ import annotations

import datetime
import json
import logging
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from cairn.checkpoint import (
    BackgroundSaver,
    CairnAsyncStager,
    CheckpointError,
    CheckpointManager,
    CorruptCheckpointError,
    FolderBusyError,
    OptimizerState,
    RNGState,
    latest_step,
    list_steps,
    load,
    open_store,
    save,
    verify,
)
from cairn.checkpoint.lease import lease_state
from cairn.checkpoint.local import LocalStore

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def group():
    """A real 1-rank gloo process group for the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


class Counter(Stateful):
    def __init__(self):
        self.step, self.tokens = 0, 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step, self.tokens = int(state_dict["step"]), int(state_dict["tokens"])


def tiny() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.2), nn.Linear(8, 2))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def train_step(model, optimizer, manager=None) -> float:
    x = torch.randn(16, 4)
    loss = model(x).pow(2).mean()
    loss.backward()
    if manager is not None:
        manager.maybe_wait_for_staging()
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def manager_for(folder, model, optimizer, counter, **config) -> CheckpointManager:
    settings = dict(enable=True, interval=2, keep_latest_k=0, last_save_model_only=False)
    settings.update(config)
    return CheckpointManager(CheckpointManager.Config(**settings), model_parts=model,
                             states={"optimizer": OptimizerState(model, optimizer), "counter": counter,
                                     "rng": RNGState()}, base_folder=folder)


@pytest.mark.parametrize("async_mode", ["disabled", "async", "async_with_pinned_mem"])
def test_manager_of_tiny_statefuls_resumes_bit_exact(group, tmp_path, async_mode):
    model, optimizer = tiny()
    counter = Counter()
    torch.manual_seed(1)
    manager = manager_for(tmp_path, model, optimizer, counter, async_mode=async_mode, when_busy="wait")
    reference = []
    for step in range(1, 7):
        reference.append(train_step(model, optimizer, manager))
        counter.step, counter.tokens = step, counter.tokens + 16
        manager.save(step, last_step=step == 6)
    manager.close()
    assert list_steps(tmp_path / "checkpoint") == [2, 4, 6]
    final = {k: v.clone() for k, v in model.state_dict().items()}

    # a new process would build everything afresh and resume from step 4
    model2, optimizer2 = tiny()
    counter2 = Counter()
    resumed = manager_for(tmp_path, model2, optimizer2, counter2)
    loaded = resumed.load(step=4)
    assert loaded and counter2.step == 4 and counter2.tokens == 64
    assert loaded.step == 4 and loaded.kind == "full" and loaded.tier == "disk" and loaded.explicit
    assert loaded.source == str(tmp_path / "checkpoint" / "step-4")
    for step in range(5, 7):
        assert train_step(model2, optimizer2, resumed) == reference[step - 1]  # bitwise
        resumed.save(step)
    resumed.close()
    for key, value in model2.state_dict().items():
        assert torch.equal(value, final[key]), key
    assert verify(tmp_path / "checkpoint") == []


def test_a_disabled_manager_touches_nothing(tmp_path):
    model, optimizer = tiny()
    manager = CheckpointManager(CheckpointManager.Config(enable=False), model_parts=model,
                                states={"optimizer": OptimizerState(model, optimizer)}, base_folder=tmp_path / "x")
    assert not dist.is_initialized()  # it needed no process group
    assert not manager.save(2) and manager.save(2).action == "skipped" and not manager.load()
    assert manager.load().tier == "none" and manager.load().step is None
    manager.maybe_wait_for_staging()
    manager.close()
    assert not (tmp_path / "x").exists()


def test_manager_without_a_process_group(tmp_path):
    """A single process that never called init_process_group (a notebook, a transformers loop)."""
    model, optimizer = tiny()
    counter = Counter()
    manager = manager_for(tmp_path, model, optimizer, counter, async_mode="async_with_pinned_mem")
    train_step(model, optimizer, manager)
    manager.prepare_async()  # the buffers are made in the background after the first step ...
    manager.async_saver.wait()  # ... and a save due before they are ready would be deferred
    counter.step = 2
    info = manager.save(2)
    assert info.kind == "full" and info.action == "started" and info.is_async
    assert info.handle.result(timeout=60) == str(tmp_path / "checkpoint" / "step-2")
    manager.close()
    assert not dist.is_initialized()
    model2, optimizer2 = tiny()
    counter2 = Counter()
    assert manager_for(tmp_path, model2, optimizer2, counter2).load() and counter2.step == 2
    for key, value in model2.state_dict().items():
        assert torch.equal(value, model.state_dict()[key])


def test_model_is_not_a_state_key(tmp_path):
    model, optimizer = tiny()
    with pytest.raises(ValueError, match="'model' is not a state key"):
        CheckpointManager(CheckpointManager.Config(enable=True), model_parts=model, states={"model": Counter()},
                          base_folder=tmp_path)


def test_per_rank_states_are_reseeded_on_another_layout(group, tmp_path, caplog):
    model, optimizer = tiny()
    rng = RNGState()
    config = CheckpointManager.Config(enable=True, interval=1, keep_latest_k=0, last_save_model_only=False)
    manager = CheckpointManager(config, model_parts=model, states={"rng": rng}, base_folder=tmp_path,
                                layout={"world_size": 1, "tp": 1})
    manager.save(1)
    manager.close()
    other = CheckpointManager(config, model_parts=model, states={"rng": RNGState()}, base_folder=tmp_path,
                              layout={"world_size": 1, "tp": 2}, seed=5)
    with caplog.at_level(logging.WARNING, logger="cairn"):
        assert other.load()
    other.close()
    assert "re-seeded per rank" in caplog.text
    torch.manual_seed(5)
    expected = torch.rand(3)
    other2 = CheckpointManager(config, model_parts=model, states={"rng": RNGState()}, base_folder=tmp_path,
                               layout={"world_size": 1, "tp": 2}, seed=5)
    other2.load()
    other2.close()
    assert torch.equal(torch.rand(3), expected)  # reseed(seed) = manual_seed(seed + rank)


def test_plain_functions_round_trip(group, tmp_path):
    model, optimizer = tiny()
    train_step(model, optimizer)
    state = {"model": model, "optimizer": OptimizerState(model, optimizer), "note": {"epoch": 3}}
    folder = tmp_path / "ckpt"
    assert latest_step(folder) is None and list_steps(folder) == []
    handle = save(state, folder, 10, info={"run": "plain"})
    assert handle.done() and handle.result() == str(folder / "step-10") and handle.committed_at is not None
    manifest = open_store(folder).read_manifest(10)
    assert manifest["run"] == "plain" and manifest["step"] == 10
    saver = BackgroundSaver("async_with_pinned_mem")
    train_step(model, optimizer)
    async_handle = save(state, folder, 11, async_saver=saver)
    saver.wait_for_staging()
    assert async_handle.result(timeout=60) == str(folder / "step-11")
    saver.close()
    assert list_steps(folder) == [10, 11] and latest_step(folder) == 11

    model2, optimizer2 = tiny()
    target = {"model": model2, "optimizer": OptimizerState(model2, optimizer2), "note": {"epoch": 0}}
    loaded = load(target, folder)
    assert loaded.step == 11 and loaded.tier == "disk" and loaded.source == str(folder / "step-11")
    assert target["note"] == {"epoch": 3}
    for key, value in model2.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    with pytest.raises(CheckpointError, match="step 12 is not a committed checkpoint"):
        load(target, folder, step=12)
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        load(target, tmp_path / "empty")


def test_a_corrupt_step_is_refused_by_a_plain_load(group, tmp_path):
    model, _ = tiny()
    save({"model": model}, tmp_path, 1)
    data = next((tmp_path / "step-1").glob("*.distcp"))
    raw = bytearray(data.read_bytes())
    raw[-20] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert any(data.name in problem for problem in verify(tmp_path))
    with pytest.raises(CorruptCheckpointError, match=data.name):
        load({"model": tiny()[0]}, tmp_path)  # verify is on by default


def test_cairn_async_stager_with_stock_async_save(group, tmp_path):
    """DCP's own async_save, staged by cairn's reused buffers, committed by cairn's writer."""
    store = LocalStore(tmp_path)
    stager = CairnAsyncStager(pin_memory=False)
    tensor = torch.arange(1000, dtype=torch.float32)
    for step in (1, 2):
        tensor += 1
        response = dcp.async_save({"t": tensor}, storage_writer=store.writer(step), async_stager=stager)
        tensor += 100  # may change at once: stage() returned with the copy taken
        future = getattr(response, "upload_completion", response)
        future.result()
        assert stager.stager.allocations == 1  # one arena, reused
    stager.close()
    loaded = {"t": torch.zeros(1000)}
    load(loaded, tmp_path, step=2)
    assert torch.equal(loaded["t"], torch.arange(1000, dtype=torch.float32) + 102)
    assert store.verify(2) == []


def test_a_second_manager_on_the_same_folder_is_refused(tmp_path, monkeypatch):
    model, optimizer = tiny()
    first = manager_for(tmp_path, model, optimizer, Counter())
    with pytest.raises(FolderBusyError, match=r"in use by another run \(host .*pid"):
        manager_for(tmp_path, model, optimizer, Counter())
    first.close()
    second = manager_for(tmp_path, model, optimizer, Counter())  # released: free again
    second.close()
    assert lease_state(open_store(tmp_path / "checkpoint")) is None


def test_deferred_save_never_waits_and_is_taken_later(tmp_path, monkeypatch):
    """A save due while the previous one is written is deferred: save() returns at once, and the
    save is taken at the first step after the previous one committed (logged, in metrics)."""
    model, optimizer = tiny()
    counter = Counter()
    monkeypatch.setenv("CAIRN_FAULT", "after_data_before_commit:sleep=1.5")  # a slow commit
    manager = manager_for(tmp_path, model, optimizer, counter, async_mode="async_with_pinned_mem",
                          async_writer="thread", when_busy="defer")
    train_step(model, optimizer, manager)
    manager.prepare_async()
    manager.async_saver.wait()
    first = manager.save(2)
    assert first.kind == "full" and first.action == "started"
    start = time.perf_counter()
    deferred = manager.save(4)
    assert time.perf_counter() - start < 0.5
    assert deferred.action == "deferred" and not deferred and deferred.record()["due_step"] == 4
    assert deferred.steps_at_risk == 4  # nothing is committed yet: a crash now loses every step
    still = manager.save(5)  # still being written: nothing taken, and it says why
    assert still.action == "skipped" and "deferred" in still.reason
    manager.async_saver.wait()
    monkeypatch.delenv("CAIRN_FAULT")
    taken = manager.save(6 + 1)  # the next step after the commit takes it
    assert taken.late_by == 3 and taken.kind == "full" and taken.action == "started"
    assert taken.steps_at_risk == 5  # step 2 is committed
    manager.close()
    assert list_steps(tmp_path / "checkpoint") == [2, 7]


def test_when_busy_wait_waits_for_the_previous_save(tmp_path, monkeypatch):
    model, optimizer = tiny()
    monkeypatch.setenv("CAIRN_FAULT", "after_data_before_commit:sleep=1.0")
    manager = manager_for(tmp_path, model, optimizer, Counter(), async_mode="async", async_writer="thread",
                          when_busy="wait")
    train_step(model, optimizer, manager)
    manager.save(2)
    waited = manager.save(4)
    assert waited.waited_s > 0.3 and waited.late_by == 0 and "waited" in waited.reason
    manager.close()
    assert list_steps(tmp_path / "checkpoint") == [2, 4]


def test_a_stopping_step_takes_the_deferred_save(tmp_path, monkeypatch):
    model, optimizer = tiny()
    monkeypatch.setenv("CAIRN_FAULT", "after_data_before_commit:sleep=1.0")
    manager = manager_for(tmp_path, model, optimizer, Counter(), async_mode="async_with_pinned_mem",
                          async_writer="thread", when_busy="defer")
    train_step(model, optimizer, manager)
    manager.prepare_async()
    manager.async_saver.wait()
    manager.save(2)
    assert manager.save(4).action == "deferred"
    stopped = manager.save(5, stopping=True)
    assert stopped.late_by == 1 and stopped.action == "saved"  # committed before it returns
    manager.close()
    assert list_steps(tmp_path / "checkpoint") == [2, 5]


def test_manifest_records_the_callers_info(tmp_path):
    model, optimizer = tiny()
    manager = CheckpointManager(CheckpointManager.Config(enable=True, interval=1, keep_latest_k=0,
                                                         last_save_model_only=False),
                                model_parts=model, states={"optimizer": OptimizerState(model, optimizer)},
                                base_folder=tmp_path, model_info={"name": "mlp", "flavor": "tiny"},
                                run_info={"config": {"lr": 0.01}}, layout={"world_size": 1, "dp": 1})
    commits = []
    manager.on_commit = lambda step, location: commits.append((step, location))
    manager.save(1)
    manager.close()
    manifest = json.loads((tmp_path / "checkpoint" / "step-1" / "cairn_manifest.json").read_text())
    assert manifest["model"] == {"name": "mlp", "flavor": "tiny"} and manifest["config"] == {"lr": 0.01}
    assert manifest["layout"] == {"world_size": 1, "dp": 1} and manifest["kind"] == "full"
    assert commits == [(1, str(tmp_path / "checkpoint" / "step-1"))]
