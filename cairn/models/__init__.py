"""Model registry: each model family is a folder with a ``get_spec()``.

The trainer and the checkpointer only speak to a ``ModelSpec``: they never name a model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class ModelSpec:
    name: str
    flavors: dict[str, Any]
    """flavor name -> model args (a dataclass with ``vocab_size`` and ``max_seq_len``)."""
    model_cls: type
    """Built as ``model_cls(args)`` under ``torch.device("meta")``."""
    init_weights: Callable[..., None]
    """``init_weights(model, seed, device)``: layout-independent initialization."""
    parallelize: Callable[..., Any]
    """``parallelize(model, parallel_dims, job_config, device)``: applies TP, AC, compile, FSDP/HSDP."""
    pipeline: Callable[..., Any]
    """``pipeline(model, parallel_dims, job_config, device, loss_fn)`` -> PipelineParts."""
    state_dict_adapter: Callable[..., Any]
    """``state_dict_adapter(model_args)``: cairn FQNs <-> Hugging Face keys."""


def get_model_spec(name: str) -> ModelSpec:
    try:
        module = importlib.import_module(f"cairn.models.{name}")
    except ModuleNotFoundError as e:
        raise ValueError(f"--model.name {name!r}: no such model family under cairn/models") from e
    return module.get_spec()
