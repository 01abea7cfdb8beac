"""Retention off the save path: a slow purge never delays a save, never two deletes at once, never
the newest committed step or one being written."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch
from torch import nn

from cairn.checkpoint import CheckpointManager, OptimizerState, list_steps, save
from cairn.checkpoint.local import LocalStore, Pacer
from cairn.checkpoint.retention import RetentionWorker

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def commit(store: LocalStore, step: int) -> None:
    save({"w": torch.full((64,), float(step))}, store, step)


@pytest.mark.parametrize("async_mode", ["disabled", "async_with_pinned_mem"])
def test_a_slow_purge_never_delays_a_save(tmp_path, monkeypatch, async_mode):
    monkeypatch.setenv("CAIRN_FAULT", "during_purge:sleep=3")  # every delete takes 3 s
    torch.manual_seed(0)
    model = nn.Linear(8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = CheckpointManager.Config(enable=True, interval=1, keep_latest_k=1, async_mode=async_mode,
                                      async_writer="thread", when_busy="wait", last_save_model_only=False)
    manager = CheckpointManager(config, model_parts=model, states={"optimizer": OptimizerState(model, optimizer)},
                                base_folder=tmp_path)
    manager.prepare_async()
    if manager.async_saver is not None:
        manager.async_saver.wait()
    blocked = []
    for step in range(1, 5):
        start = time.perf_counter()
        manager.save(step)
        if manager.async_saver is not None:
            manager.async_saver.wait()  # the save itself done: what is left is retention's
        blocked.append(time.perf_counter() - start)
    # deletes of steps 1, 2 and 3 take 3 s each on the retention thread; no save waited for one
    assert max(blocked) < 2.0, blocked
    retention = manager._retention
    assert retention is not None and retention.wait_idle(timeout=60)
    manager.close()
    assert list_steps(tmp_path / "checkpoint") == [4]


def test_retention_keeps_the_newest_and_the_protected(tmp_path):
    store = LocalStore(tmp_path)
    for step in (1, 2, 3, 4):
        commit(store, step)
    worker = RetentionWorker(store, 1, protect=lambda: {2})
    worker.request()
    assert worker.wait_idle(timeout=30)
    worker.close()
    assert store.committed_steps() == [2, 4]
    assert sorted(worker.deleted) == [1, 3]
    with pytest.raises(ValueError, match="keep_latest_k"):
        RetentionWorker(store, 0)


def test_never_two_deletes_at_once(tmp_path, monkeypatch):
    store = LocalStore(tmp_path)
    for step in range(1, 7):
        commit(store, step)
    active, peak = [0], [0]
    lock = threading.Lock()
    real_delete = store.delete

    def counting_delete(step, pacer=None):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        try:
            return real_delete(step, pacer)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(store, "delete", counting_delete)
    worker = RetentionWorker(store, 2)
    for _ in range(5):  # requests while a pass runs coalesce into one more pass
        worker.request()
    assert worker.wait_idle(timeout=30)
    worker.close()
    assert peak[0] == 1 and store.committed_steps() == [5, 6]


def test_the_pacer_shrinks_large_files_in_chunks(tmp_path):
    folder = tmp_path / "trash"
    folder.mkdir()
    big = folder / "big.bin"
    with open(big, "wb") as f:
        f.truncate(10 << 20)
    (folder / "small.bin").write_bytes(b"x" * 100)
    sizes = []
    pacer = Pacer(chunk_bytes=3 << 20, pause_s=0.0)
    real_ftruncate = os.ftruncate

    def recording(fd, size):
        sizes.append(size)
        return real_ftruncate(fd, size)

    os.ftruncate = recording
    try:
        assert pacer.remove_tree(folder)
    finally:
        os.ftruncate = real_ftruncate
    assert sizes == [7 << 20, 4 << 20, 1 << 20, 0] and not folder.exists()


def test_a_slow_disk_is_reported(tmp_path, monkeypatch, caplog):
    import logging

    store = LocalStore(tmp_path)
    for step in (1, 2, 3):
        commit(store, step)
    monkeypatch.setenv("CAIRN_FAULT", "during_purge:sleep=0.5")
    worker = RetentionWorker(store, 1)
    with caplog.at_level(logging.WARNING, logger="cairn"):
        worker.request()
        time.sleep(0.1)
        worker.request()  # the "saves" come 0.1 s apart; each delete takes 0.5 s
        assert worker.wait_idle(timeout=30)
    worker.close()
    assert "cannot delete old steps as fast as they are written" in caplog.text
