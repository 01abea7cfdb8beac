"""One format for the manager and the plain functions, on 2 real gloo ranks with FSDP2: the
documented ``{"model": model, "optimizer": OptimizerState(model, optimizer)}`` saved by ``save``
resumes through a ``CheckpointManager``, and a manager's step loads through ``load``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).parent))
from _launch import run_distributed  # noqa: E402

pytestmark = pytest.mark.distributed


def _sharded(world_size: int, seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    fully_shard(model, mesh=init_device_mesh("cpu", (world_size,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()  # the optimizer has state to save
    optimizer.zero_grad()
    return model, optimizer


def _full(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.full_tensor() if isinstance(v, DTensor) else v for k, v in model.state_dict().items()}
    for i, state in enumerate(optimizer.state.values()):
        out[f"exp_avg.{i}"] = state["exp_avg"].full_tensor()
    return out


def _both_ways(rank: int, world_size: int, folder: str) -> bool:
    from cairn.checkpoint import CheckpointManager, OptimizerState, load, save

    saved_model, saved_optimizer = _sharded(world_size, seed=1)
    save({"model": saved_model, "optimizer": OptimizerState(saved_model, saved_optimizer)}, f"{folder}/checkpoint", 3)
    model, optimizer = _sharded(world_size, seed=2)
    config = CheckpointManager.Config(enable=True, interval=1, last_save_model_only=False)
    manager = CheckpointManager(config, model_parts=[model], states={"optimizer": OptimizerState(model, optimizer)},
                                base_folder=folder)
    loaded = manager.load()
    plain_into_manager = loaded.step == 3 and all(
        torch.equal(a, b) for a, b in zip(_full(model, optimizer).values(), _full(saved_model, saved_optimizer).values()))
    manager.save(4)
    manager.close()
    other, other_optimizer = _sharded(world_size, seed=3)
    result = load({"model": other, "optimizer": OptimizerState(other, other_optimizer)}, f"{folder}/checkpoint")
    manager_into_plain = result.step == 4 and all(
        torch.equal(a, b) for a, b in zip(_full(other, other_optimizer).values(), _full(model, optimizer).values()))
    return plain_into_manager and manager_into_plain


def test_fsdp2_steps_load_both_ways(tmp_path):
    assert run_distributed(_both_ways, 2, str(tmp_path)) == [True, True]
