"""The training loop's garbage collection schedule (--training.gc_freq)."""

from __future__ import annotations

import gc

import pytest

from cairn.trainer import GarbageCollection


@pytest.fixture
def collections():
    seen: list[int] = []

    def callback(phase, info):
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(callback)
    yield seen
    gc.callbacks.remove(callback)


def test_automatic_collection_is_off_in_the_loop_and_young_collections_run_on_schedule(collections):
    assert gc.isenabled()
    with GarbageCollection(3) as collector:
        assert not gc.isenabled()
        collections.clear()
        for step in range(1, 10):
            collector.run(step)
        assert collections == [1, 1, 1]  # before steps 3, 6 and 9; never a full collection
    assert gc.isenabled()


def test_zero_leaves_python_in_charge(collections):
    with GarbageCollection(0) as collector:
        assert gc.isenabled()
        collections.clear()
        for step in range(1, 10):
            collector.run(step)
        assert collections == []
    assert gc.isenabled()


def test_a_disabled_collector_stays_disabled():
    gc.disable()
    try:
        with GarbageCollection(5):
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
