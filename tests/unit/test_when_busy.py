"""A save due while the previous async save is still being written: wait, coalesce, defer.

Real async saves on one process, each commit slowed by the fault point so that the writer is
busy across several steps; what each mode does, what it says, and which steps end up on disk."""

from __future__ import annotations

import logging

import pytest
import torch

from cairn.checkpoint import list_steps, load
from test_library import Counter, manager_for, tiny, train_step

SLOW_COMMIT = "after_data_before_commit:sleep=1.5"


def run(tmp_path, monkeypatch, mode: str, steps: int, *, slow_until: int, stopping: int | None = None):
    """Steps 1..steps with a save every 2; commits are slow for saves staged up to ``slow_until``,
    and after that step the save being written is committed before the next (time passes).
    Returns the results by step, the model's weights by step and the manager (closed)."""
    model, optimizer = tiny()
    counter = Counter()
    monkeypatch.setenv("CAIRN_FAULT", SLOW_COMMIT)
    manager = manager_for(tmp_path, model, optimizer, counter, async_mode="async_with_pinned_mem",
                          async_writer="thread", when_busy=mode)
    train_step(model, optimizer, manager)
    manager.prepare_async()
    for saver in (manager.async_saver, manager._spare):
        if saver is not None:
            saver.wait()  # the buffers are ready before the first save is due
    results, weights = {}, {}
    for step in range(1, steps + 1):
        if step > 1:
            train_step(model, optimizer, manager)
        counter.step = step
        weights[step] = {k: v.clone() for k, v in model.state_dict().items()}
        results[step] = manager.save(step, stopping=step == stopping)
        if step == slow_until:
            monkeypatch.delenv("CAIRN_FAULT")
            manager.async_saver.wait()
    manager.close()
    return results, weights, manager


def test_coalesce_stages_the_newest_due_state_and_writes_it_next(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="cairn"):
        results, weights, manager = run(tmp_path, monkeypatch, "coalesce", 9, slow_until=6, stopping=None)
    assert results[2].action == "started"
    staged = results[4]
    assert staged.action == "coalesced" and not staged and staged.stall_s < 0.5 and staged.steps_at_risk == 4
    assert "will" not in staged.reason and "written as soon as that one is committed" in staged.reason
    replacing = results[6]
    assert replacing.action == "coalesced" and replacing.replaced_step == 4  # step 4's state is never written
    assert "a crash now would lose 6 steps, more than Config.interval (2)" in caplog.text
    # once step 2 is committed, the next call starts writing the state staged at step 6
    started = next(r for s, r in results.items() if s > 6 and r.action == "started" and r.step == 6)
    assert started.handle.result(timeout=60) == str(tmp_path / "checkpoint" / "step-6")
    assert 4 not in list_steps(tmp_path / "checkpoint") and {2, 6} <= set(list_steps(tmp_path / "checkpoint"))
    # what step 6 holds is the state at step 6, not at the step that started the write
    model, _ = tiny()
    counter = Counter()
    load({"model": model, "counter": counter}, tmp_path / "checkpoint", step=6)
    assert counter.step == 6
    assert all(torch.equal(value, weights[6][key]) for key, value in model.state_dict().items())


def test_coalesce_drops_a_staged_state_that_a_newer_due_one_supersedes(tmp_path, monkeypatch):
    """Staged at 4 while 2 is written; at 6 the writer is free: step 6 is saved, not the older 4."""
    model, optimizer = tiny()
    monkeypatch.setenv("CAIRN_FAULT", SLOW_COMMIT)
    manager = manager_for(tmp_path, model, optimizer, Counter(), async_mode="async", async_writer="thread",
                          when_busy="coalesce")
    train_step(model, optimizer, manager)
    manager.prepare_async()
    manager.async_saver.wait()
    manager._spare.wait()
    assert manager.save(2).action == "started"
    assert manager.save(4).action == "coalesced"
    monkeypatch.delenv("CAIRN_FAULT")
    manager.async_saver.wait()  # step 2 committed
    taken = manager.save(6)
    assert taken.action == "started" and taken.step == 6 and taken.replaced_step == 4
    assert manager.save(7, stopping=True).action == "skipped"  # nothing due, staged or deferred
    manager.close()
    assert list_steps(tmp_path / "checkpoint") == [2, 6]


def test_a_stopping_step_and_close_drop_a_staged_state(tmp_path, monkeypatch):
    results, _, _ = run(tmp_path, monkeypatch, "coalesce", 5, slow_until=5, stopping=5)
    assert results[4].action == "coalesced"
    assert results[5].action == "saved" and results[5].replaced_step == 4  # the stop saves the newer state
    assert list_steps(tmp_path / "checkpoint") == [2, 5]
    closed, _, _ = run(tmp_path / "closed", monkeypatch, "coalesce", 4, slow_until=4)
    assert closed[4].action == "coalesced"
    assert list_steps(tmp_path / "closed" / "checkpoint") == [2]  # close() drops it: nothing half-written


@pytest.mark.parametrize("mode", ["wait", "defer"])
def test_wait_and_defer_with_a_slow_commit(tmp_path, monkeypatch, mode, caplog):
    with caplog.at_level(logging.WARNING, logger="cairn"):
        results, _, manager = run(tmp_path, monkeypatch, mode, 8, slow_until=4)
    actions = {step: result.action for step, result in results.items() if result.action != "skipped"}
    steps = list_steps(tmp_path / "checkpoint")
    if mode == "wait":
        assert actions == {2: "started", 4: "started", 6: "started", 8: "started"} and steps == [2, 4, 6, 8]
        assert results[4].waited_s > 0.5 and "training waited" in caplog.text
    else:
        assert actions[2] == "started" and actions[4] == "deferred" and results[4].steps_at_risk == 4
        late = next(result for result in results.values() if result.late_by)
        assert late.action == "started" and late.step > 4 and late.step - late.late_by == 4
        assert 4 not in steps and late.step in steps
        assert "a crash now would lose 4 steps, more than Config.interval (2)" in caplog.text
    assert all(result.record()["action"] == result.action for result in results.values())
