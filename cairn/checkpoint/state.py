"""Training state as checkpointable objects, and walking a state dict's tensors.

A checkpoint is one flat DCP state dict: the model's FQNs at the top level, then one entry
per ``Stateful`` the caller passes (``optimizer``, ``lr_scheduler``, ``dataloader``, ...).
``ModelState`` and ``OptimizerState`` wrap a plain PyTorch model and optimizer the way DCP's
``get_state_dict`` helpers see them, so any training loop (FSDP2, TP, a transformers model)
gets canonical, resharding-safe keys. A state whose values are only meaningful on the layout
that saved them (per-rank RNG streams) implements ``reseed(seed)``: on another layout the
manager re-seeds it instead of restoring it.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Protocol, runtime_checkable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor

MODEL = "model"  # not a state key: model FQNs sit at the top level of a checkpoint


@runtime_checkable
class PerRankState(Protocol):
    """A state whose saved values only mean something on the layout (world size, degrees) that saved them."""

    def reseed(self, seed: int) -> None: ...


class ModelState(Stateful):
    """The model parts (pipeline stages, or one module) as one FQN-keyed state dict."""

    def __init__(self, model_parts: nn.Module | list[nn.Module]):
        self.model_parts = [model_parts] if isinstance(model_parts, nn.Module) else list(model_parts)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in self.model_parts:
            out.update(get_model_state_dict(part))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for part in self.model_parts:
            keys = get_model_state_dict(part).keys()
            set_model_state_dict(part, {k: state_dict[k] for k in keys}, options=StateDictOptions(strict=True))


class OptimizerState(Stateful):
    """One optimizer over one model (FSDP2/TP/plain), keyed by parameter FQNs (DCP's flattened
    form), so it reshards like the model. For several model parts with one optimizer each, pass
    lists of the same length."""

    def __init__(self, model: nn.Module | list[nn.Module], optimizer: torch.optim.Optimizer | list):
        self.models = [model] if isinstance(model, nn.Module) else list(model)
        self.optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
        if len(self.models) != len(self.optimizers):
            raise ValueError(f"OptimizerState: {len(self.models)} model part(s) but {len(self.optimizers)} "
                             "optimizer(s); pass one optimizer per part")
        self._options = StateDictOptions(flatten_optimizer_state_dict=True)

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for model, optimizer in zip(self.models, self.optimizers):
            out.update(get_optimizer_state_dict(model, optimizer, options=self._options))
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for model, optimizer in zip(self.models, self.optimizers):
            set_optimizer_state_dict(model, optimizer, state_dict, options=self._options)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (the local shard of a DTensor)."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def tensor_leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor in a nested dict/list state dict, in a fixed order."""
    if isinstance(obj, dict):
        for key in sorted(obj, key=str):
            yield from tensor_leaves(obj[key], f"{prefix}{key}/")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from tensor_leaves(value, f"{prefix}{i}/")
    elif isinstance(obj, torch.Tensor):
        yield prefix, obj


def state_bytes(state_dict: Any) -> int:
    """Bytes of this rank's tensors in a (nested) state dict: local shards, not global sizes."""
    return sum(nbytes(local_tensor(tensor)) for _, tensor in tensor_leaves(state_dict))


class RNGState(Stateful):
    """Every rank's random number generator states (torch CPU, CUDA, Python's ``random``).

    Each rank saves under its own key (``rank_<r>``), as uint8 tensors and ints only, so the
    state loads with ``weights_only=True``. On a different layout the manager skips these and
    re-seeds each rank instead (``reseed``): a rank's stream has no meaning in another world.
    """

    def __init__(self, rank: int | None = None, world_size: int | None = None,
                 device: torch.device | str | None = None):
        import torch.distributed as dist

        initialized = dist.is_available() and dist.is_initialized()
        self.rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
        self.world_size = world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
        self.device = torch.device(device) if device is not None else torch.device("cpu")

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
