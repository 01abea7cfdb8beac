"""Every rank's random number generator states, as a checkpointable Stateful.

Each rank saves under its own key (``rank_<r>``), as uint8 tensors and ints only, so the
state loads with ``weights_only=True``. On a different layout the manager skips these and
re-seeds each rank instead (a rank's stream has no meaning in another world).
"""

from __future__ import annotations

import random

import torch
from torch.distributed.checkpoint.stateful import Stateful


class RNGState(Stateful):
    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device

    @property
    def key(self) -> str:
        return f"rank_{self.rank}"

    def state_dict(self) -> dict:
        state = {"torch_cpu": torch.get_rng_state(),
                 "python": _python_state_to_tensor(random.getstate())}
        if self.device.type == "cuda":
            state["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return {self.key: state}

    def load_state_dict(self, state_dict: dict) -> None:
        state = state_dict[self.key]
        torch.set_rng_state(state["torch_cpu"].cpu())
        random.setstate(_python_state_from_tensor(state["python"]))
        if self.device.type == "cuda" and "torch_cuda" in state:
            torch.cuda.set_rng_state(state["torch_cuda"].cpu(), self.device)

    def reseed(self, seed: int) -> None:
        """A fresh, rank-distinct stream for a run whose layout differs from the checkpoint's."""
        torch.manual_seed(seed + self.rank)
        random.seed(seed + self.rank)


def _python_state_to_tensor(state: tuple) -> torch.Tensor:
    """(version, 625 ints, gauss_next) -> float64 tensor; the ints are < 2**32, exact in float64."""
    version, internal, gauss = state
    return torch.tensor([version, *internal, float("nan") if gauss is None else gauss], dtype=torch.float64)


def _python_state_from_tensor(tensor: torch.Tensor) -> tuple:
    values = tensor.tolist()
    gauss = None if values[-1] != values[-1] else values[-1]
    return (int(values[0]), tuple(int(v) for v in values[1:-1]), gauss)
