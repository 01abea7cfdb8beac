"""LocalStore on 2 real gloo ranks: sync and async saves of DTensor and FSDP2 state,
commit only when every rank is done, per-rank write errors, a rank killed mid-save.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

sys.path.insert(0, str(Path(__file__).parent))
from _launch import run_distributed  # noqa: E402

from cairn.checkpoint.reader import load_full_state_dict  # noqa: E402
from cairn.checkpoint.errors import find_checkpoint_error  # noqa: E402
from cairn.checkpoint.faults import FAULT_ENV, FAULT_RANK_ENV  # noqa: E402
from cairn.checkpoint.local import LocalStore  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.filterwarnings("ignore::UserWarning")]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _state(rank: int, step: int, mesh, model) -> dict:
    full = torch.arange(64 * 4, dtype=torch.float32).reshape(64, 4) * step
    return {
        "dtensor.weight": distribute_tensor(full, mesh, [Shard(0)]),
        "replicated.bias": torch.full((3,), float(step)),
        **{f"fsdp.{k}": v for k, v in get_model_state_dict(model).items()},
        "train_state": {"step": step, "tokens_seen": 1000 * step},
        "rng": {f"rank_{rank}": {"seed": 100 + rank, "step": step}},
    }


class _WaitForFile(DefaultSavePlanner):
    """Holds this rank's writes until ``path`` exists (lets rank 0 look at the folder mid-save)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def resolve_data(self, write_item):
        deadline = time.monotonic() + 60
        while not self.path.exists():
            assert time.monotonic() < deadline, "gate file never appeared"
            time.sleep(0.01)
        return super().resolve_data(write_item)


def _wait_for(predicate, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _save_load_and_fail(rank: int, world_size: int, folder: str) -> dict:
    warnings.filterwarnings("ignore")
    from torch.distributed.fsdp import fully_shard

    storage = LocalStore(folder)
    mesh = init_device_mesh("cpu", (world_size,))
    model = _model()
    fully_shard(model, mesh=mesh)

    # 1. sync save: committed when dcp.save returns, on every rank
    dcp.save(_state(rank, 1, mesh, model), storage_writer=storage.writer(1, {"kind": "full"}))
    assert storage.committed_steps() == [1]

    # 2. async save: rank 1 is held back; rank 0 sees the save in flight and not committed
    gate = Path(folder) / "gate"
    planner = _WaitForFile(gate) if rank == 1 else DefaultSavePlanner()
    future = dcp.async_save(_state(rank, 2, mesh, model), storage_writer=storage.writer(2, {"kind": "full"}),
                            planner=planner)
    future = getattr(future, "upload_completion", future)
    if rank == 0:
        _wait_for(lambda: (Path(folder) / ".tmp-step-2" / "__0_0.distcp").exists())
        time.sleep(0.2)  # rank 0's part is written; rank 1 is still gated
        in_flight = storage.committed_steps()
        gate.touch()
    future.result(timeout=60)
    assert storage.committed_steps() == [1, 2]

    # 3. load into fresh state, DTensor shards and FSDP2 params alike
    fresh_model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    fully_shard(fresh_model, mesh=mesh)
    loaded = _state(rank, 0, mesh, fresh_model)
    loaded["train_state"], loaded["rng"] = {"step": -1, "tokens_seen": -1}, {f"rank_{rank}": {"seed": -1, "step": -1}}
    dcp.load(loaded, storage_reader=storage.reader(storage.step_dir(2), verify=True),
             planner=storage.load_planner())
    expected = _state(rank, 2, mesh, model)
    assert torch.equal(loaded["dtensor.weight"].full_tensor(), expected["dtensor.weight"].full_tensor())
    assert torch.equal(loaded["replicated.bias"], expected["replicated.bias"])
    for key, value in expected.items():
        if key.startswith("fsdp."):
            assert isinstance(loaded[key], DTensor) and torch.equal(loaded[key].full_tensor(), value.full_tensor())
    assert loaded["train_state"] == {"step": 2, "tokens_seen": 2000}
    assert loaded["rng"] == {f"rank_{rank}": {"seed": 100 + rank, "step": 2}}
    set_model_state_dict(fresh_model, {k.removeprefix("fsdp."): v for k, v in loaded.items()
                                       if k.startswith("fsdp.")})

    # 4. a write error on rank 1 only: every rank fails, nothing is committed
    os.environ.update({FAULT_ENV: "mid_data:enospc", FAULT_RANK_ENV: "1"})
    try:
        dcp.save(_state(rank, 3, mesh, model), storage_writer=storage.writer(3, {"kind": "full"}))
        raise AssertionError("the save should have failed")
    except BaseException as e:  # DCP's CheckpointException derives from BaseException
        error = find_checkpoint_error(e)
        assert error is not None, repr(e)
        message = str(error)
    finally:
        del os.environ[FAULT_ENV], os.environ[FAULT_RANK_ENV]
    assert storage.committed_steps() == [1, 2]
    dist.barrier()

    result = {"error": message}
    if rank == 0:
        result["in_flight"] = in_flight
        result["manifest"] = storage.read_manifest(storage.step_dir(2))
        result["verify"] = storage.verify(storage.step_dir(2))
    return result


def test_two_ranks_save_async_save_load_and_fail(tmp_path):
    folder = tmp_path / "checkpoint"
    results = run_distributed(_save_load_and_fail, 2, str(folder), timeout_s=120)
    first = results[0]
    assert first["in_flight"] == [1]  # step 2 was invisible while rank 1 was still writing
    assert first["verify"] == []
    files = first["manifest"]["files"]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= set(files)
    assert all(record["checksum"] and record["size"] > 0 for record in files.values())
    assert "rng.rank_1.seed" in files["__1_0.distcp"]["fqns"] and "rng.rank_0.seed" in files["__0_0.distcp"]["fqns"]
    assert first["manifest"]["entries"]["dtensor.weight"]["num_chunks"] == 2
    for result in results:
        assert "rank 1" in result["error"] and "disk full" in result["error"] and "step 3" in result["error"]

    storage = LocalStore(folder)
    assert storage.committed_steps() == [1, 2]
    # the 2-rank save, read back whole in one process: stock converter and cairn's safe loader
    dcp_to_torch_save(storage.step_dir(2), tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=True)
    expected = torch.arange(64 * 4, dtype=torch.float32).reshape(64, 4) * 2
    assert torch.equal(full["dtensor.weight"], expected)
    assert full["rng"] == {"rank_0": {"seed": 100, "step": 2}, "rank_1": {"seed": 101, "step": 2}}
    safe = load_full_state_dict(storage.step_dir(2), verify=True)
    assert torch.equal(safe["dtensor.weight"], expected) and safe["train_state"]["step"] == 2
    assert [path.name for path in storage.cleanup_incomplete()] == [".tmp-step-3"]


def _save_then_die(rank: int, world_size: int, folder: str) -> None:
    storage = LocalStore(folder)
    mesh = init_device_mesh("cpu", (world_size,))
    model = _model()
    dcp.save(_state(rank, 1, mesh, model), storage_writer=storage.writer(1, {"kind": "full"}))
    os.environ.update({FAULT_ENV: "mid_data", FAULT_RANK_ENV: "1"})
    dcp.save(_state(rank, 2, mesh, model), storage_writer=storage.writer(2, {"kind": "full"}))


def test_rank_killed_mid_save_leaves_previous_step(tmp_path):
    folder = tmp_path / "checkpoint"
    with pytest.raises(Exception, match="signal|exit|SIGKILL"):
        run_distributed(_save_then_die, 2, str(folder), timeout_s=120)
    storage = LocalStore(folder)
    assert storage.committed_steps() == [1]
    assert storage.verify(storage.step_dir(1)) == []
    state = load_full_state_dict(storage.step_dir(1), verify=True)
    assert torch.equal(state["dtensor.weight"], torch.arange(64 * 4, dtype=torch.float32).reshape(64, 4))
    assert [path.name for path in storage.cleanup_incomplete()] == [".tmp-step-2"]


def _default_load_refuses_damage_on_every_rank(rank: int, world_size: int, folder: str) -> str:
    from torch.distributed.fsdp import fully_shard

    from cairn.checkpoint import CorruptCheckpointError, load, save

    mesh = init_device_mesh("cpu", (world_size,))
    model = _model()
    fully_shard(model, mesh=mesh)
    save(_state(rank, 1, mesh, model), folder, 1)
    dist.barrier()
    if rank == 0:  # same size, one byte: only rank 1's file, which rank 0 never reads
        data = Path(folder) / "step-1" / "__1_0.distcp"
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    dist.barrier()
    fresh = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    fully_shard(fresh, mesh=mesh)
    try:
        load(_state(rank, 0, mesh, fresh), folder)  # verify is on by default
    except CorruptCheckpointError as e:
        return str(e)
    return "loaded"


def test_damage_in_one_ranks_file_fails_the_load_on_every_rank(tmp_path):
    messages = run_distributed(_default_load_refuses_damage_on_every_rank, 2, str(tmp_path / "ckpt"))
    assert all("__1_0.distcp" in message and "checksum mismatch" in message for message in messages), messages
