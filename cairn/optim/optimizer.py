"""Optimizers keyed by parameter FQN, one per model part (pipeline stage).

The state dict is DCP's flattened, FQN-keyed form (``state.<fqn>.exp_avg``,
``param_groups.<fqn>.lr``): independent of parameter order and of the parallel layout, so
a checkpoint reshards, and pipeline stages' states merge without collisions.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

from cairn.config.job_config import OptimizerSection

_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


class OptimizersContainer(Stateful):
    def __init__(self, model_parts: list[nn.Module], config: OptimizerSection):
        cls = {"AdamW": torch.optim.AdamW, "Adam": torch.optim.Adam}[config.name]
        kwargs = dict(lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps,
                      weight_decay=config.weight_decay, foreach=True)
        self.model_parts = model_parts
        self.optimizers = [cls(part.parameters(), **kwargs) for part in model_parts]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        out: dict = {}
        for part, optimizer in zip(self.model_parts, self.optimizers):
            out.update(get_optimizer_state_dict(part, optimizer, options=_FLAT))
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        for part, optimizer in zip(self.model_parts, self.optimizers):
            set_optimizer_state_dict(part, optimizer, state_dict, options=_FLAT)


def build_optimizers(model_parts: list[nn.Module], config: OptimizerSection) -> OptimizersContainer:
    return OptimizersContainer(model_parts, config)


@torch.no_grad()
def clip_grad_norm_(parameters: list[torch.Tensor], max_norm: float, pp_group=None) -> torch.Tensor:
    """Clip by the global gradient norm across every shard and pipeline stage; returns the norm.

    Gradients on different device meshes (an MoE's experts live on the expert-parallel mesh, the
    rest on the dense one) cannot be reduced together: each mesh's norm is taken on its own and
    the squares are summed.
    """
    by_mesh: dict[int, list[torch.Tensor]] = {}
    params_by_mesh: dict[int, list[torch.Tensor]] = {}
    for param in parameters:
        if param.grad is not None:
            mesh = id(getattr(param.grad, "device_mesh", None))
            by_mesh.setdefault(mesh, []).append(param.grad)
            params_by_mesh.setdefault(mesh, []).append(param)
    if len(by_mesh) <= 1:
        grads = [grad for group in by_mesh.values() for grad in group]
        total = _full(torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True))
    else:
        squares = [_full(torch.nn.utils.get_total_norm(group, norm_type=2.0, foreach=True)).pow(2)
                   for group in by_mesh.values()]
        total = torch.stack(squares).sum().sqrt()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        squared = total.pow(2)
        dist.all_reduce(squared, op=dist.ReduceOp.SUM, group=pp_group)
        total = squared.sqrt()
    if max_norm > 0:
        for group in params_by_mesh.values():
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total, foreach=True)
    return total


def _full(norm: torch.Tensor) -> torch.Tensor:
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
