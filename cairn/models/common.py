"""Building blocks every cairn model shares: RMSNorm, the SwiGLU feed-forward, per-FQN initialization.

``init_weights`` is what makes a model's first weights independent of the parallel layout: each
parameter is drawn whole from a generator seeded by ``(seed, crc32(fqn))`` and only the rank's
shard is kept. A model provides ``init_spec(fqn) -> (kind, std)`` and ``init_buffers(device)``.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def fill(tensor: torch.Tensor, kind: str, std: float, generator: torch.Generator) -> None:
    """Fill ``tensor`` the way ``init_spec`` says: "ones", "zeros", "normal" or "trunc_normal" (3 std)."""
    if kind == "ones":
        tensor.fill_(1.0)
    elif kind == "zeros":
        tensor.zero_()
    elif kind == "normal":
        tensor.normal_(0.0, std, generator=generator)
    else:
        nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)


def seeded_generator(seed: int, fqn: str, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63))
    return generator


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, device: torch.device | str) -> None:
    """Initialize every parameter from a generator seeded by (seed, FQN).

    Each full tensor is drawn on ``device`` and only this rank's shard is kept, so every
    parallel layout (FSDP, TP, EP, PP, one process) starts from bit-identical weights on the
    same device type.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    device = torch.device(device)
    model.init_buffers(device)
    seen: set[int] = set()
    for fqn, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue  # tied weights: initialized once, through the first name
        seen.add(id(param))
        kind, std = model.init_spec(fqn)
        full = torch.empty(param.shape, dtype=torch.float32, device=device)
        fill(full, kind, std, seeded_generator(seed, fqn, device))
        if isinstance(param, DTensor):
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)
