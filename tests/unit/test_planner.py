"""CairnSavePlanner: the files of the default planner, with non-tensor bytes memoized and plans cached."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.distributed.checkpoint as dcp

from cairn.checkpoint.planner import PLAN_CACHING, BytesMemo, CairnSavePlanner
from cairn.checkpoint.local import LocalStore
from test_staging import data_checksums
from test_storage import assert_same, load, make_state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DCP warns that no process group exists


def torch_saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("value", [0.001, -0.0, 0.0, 1, True, False, None, "adamw", (0.9, 0.95), [1, 2.5],
                                   float("nan"), float("inf"), 10**30, b"x"])
def test_memo_returns_what_torch_save_writes(value):
    memo = BytesMemo()
    for crc in (False, True):  # the key includes torch's zip CRC setting
        torch.serialization.set_crc32_options(crc)
        try:
            for _ in range(2):
                assert memo.serialize(value).getvalue() == torch_saved(value)
        finally:
            torch.serialization.set_crc32_options(True)
    assert memo.hits >= 2


def test_memo_keeps_equal_values_of_other_types_apart():
    memo = BytesMemo()
    for value in (1, 1.0, True, 0.0, -0.0, (1,), [1]):
        assert memo.serialize(value).getvalue() == torch_saved(value), value
    assert memo.misses == 7 and memo.hits == 0


def test_memo_leaves_other_objects_to_torch_save():
    memo = BytesMemo()
    assert memo.serialize({"lr": 0.1}) is None
    assert memo.serialize(torch.tensor(1.0)) is None
    assert memo.serialize(list(range(100))) is None  # long containers are not worth a key
    assert memo.serialize(math.pi) is not None


def blank(value):
    """``value``'s structure with other contents, for a load to fill in."""
    if isinstance(value, dict):
        return {key: blank(v) for key, v in value.items()}
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return -1
    return value


def load_like(storage: LocalStore, step: int, expected: dict) -> dict:
    state = blank(expected)
    storage.load(state, storage.step_dir(step), verify=True, no_dist=True)
    return state


def save_with(planner, storage: LocalStore, step: int, state: dict) -> None:
    dcp.save(state, storage_writer=storage.writer(step, {"kind": "full"}), planner=planner, no_dist=True)


class RecordingPlanner(CairnSavePlanner):
    local_plans: list = []

    def create_local_plan(self):
        plan = super().create_local_plan()
        RecordingPlanner.local_plans.append(plan)
        return plan


def test_repeated_saves_write_the_default_planners_files(tmp_path):
    storage = LocalStore(tmp_path / "checkpoint")
    memo = BytesMemo()
    RecordingPlanner.local_plans = []
    for step in (1, 2, 3):  # the plan of saves 2 and 3 comes from DCP's cache where it has one
        save_with(RecordingPlanner(memo), storage, step, make_state(step))
        save_with(None, storage, 100 + step, make_state(step))
        assert data_checksums(storage, step) == data_checksums(storage, 100 + step)
        assert_same(load(storage, step), make_state(step))
    assert memo.hits > 0
    sent = [len(plan.items) for plan in RecordingPlanner.local_plans]
    # with caching, an unchanged local plan is not sent again (DCP sends an empty one)
    assert sent[0] > 0 and sent[1:] == ([0, 0] if PLAN_CACHING else [sent[0]] * 2)


def test_a_changed_state_is_planned_anew(tmp_path):
    storage = LocalStore(tmp_path / "checkpoint")
    memo = BytesMemo()
    save_with(CairnSavePlanner(memo), storage, 1, make_state(1))
    grown = make_state(2)
    grown["layers.1.attention.wq.weight"] = torch.randn(16, 16)
    grown["optimizer"]["param_groups"][0]["betas"] = (0.9, 0.95)
    save_with(CairnSavePlanner(memo), storage, 2, grown)
    assert_same(load_like(storage, 2, grown), grown)
    reshaped = make_state(3)
    reshaped["norm.weight"] = torch.rand(24)
    save_with(CairnSavePlanner(memo), storage, 3, reshaped)
    assert_same(load_like(storage, 3, reshaped), reshaped)
    save_with(CairnSavePlanner(memo), storage, 4, make_state(4))  # back to the first layout
    assert_same(load(storage, 4), make_state(4))
    assert storage.verify(storage.step_dir(4)) == []


def test_plan_caching_is_on_where_dcp_has_it():
    planner = CairnSavePlanner(BytesMemo())
    assert getattr(planner, "_enable_plan_caching", False) == PLAN_CACHING
