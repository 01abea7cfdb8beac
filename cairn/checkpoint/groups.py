"""Every tensor a load fills is in the checkpoint, whole; grouped tensors (an MoE's experts) are counted.

A model's adapter may name the tensors whose dim 0 indexes members of a group
(``sd_adapter.tensor_group(fqn) -> ("experts", 8)``): an MoE layer's grouped experts. The
manager then counts them, with every other state tensor that belongs to them (the optimizer's
moments, ``optimizer.state.<fqn>.exp_avg``), into each manifest (``"grouped": {"experts":
{"size": 8, "keys": [...]}}``), where ``cairn checkpoint verify`` and every load find them again.

Before a load reads a byte, ``load_problems`` names every tensor key of the target that the
checkpoint lacks, stores with another shape (a zero-length expert tensor among them) or holds
only in part (a rank's chunk never written): DCP itself would leave such a tensor as it was.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from cairn.checkpoint.dcp_metadata import coverage_gap, grouped_record, index_ranges
from cairn.checkpoint.errors import CheckpointError


def flat_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a (nested) state dict under the flat keys DCP stores them by."""
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict

    flat, _ = flatten_state_dict(state)
    return {key: value for key, value in flat.items() if isinstance(value, torch.Tensor)}


def grouped_tensors(flat: dict[str, torch.Tensor], group_of: Callable[[str], tuple[str, int] | None] | None
                    ) -> dict[str, dict[str, Any]]:
    """{group: {"size": members, "keys": [...]}} of the grouped tensors in ``flat`` (the model's, and
    every other key that names one of them, such as its optimizer moments). Raises CheckpointError
    naming a tensor whose dim 0 does not hold every member."""
    if group_of is None:
        return {}
    owners = {key: group for key in flat if (group := group_of(key))}
    if not owners:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key, tensor in flat.items():
        owner = _owner(key, owners)
        if owner is None:
            continue
        name, size = owners[owner]
        if tensor.dim() == 0 and key != owner:
            continue  # a per-tensor scalar (an optimizer's step count) holds no members
        if tensor.dim() == 0 or tensor.shape[0] != size:
            raise CheckpointError(f"{key}: holds {tensor.shape[0] if tensor.dim() else 0} {name} where the model "
                                  f"has {size}; refusing to save a checkpoint that misses {name}")
        group = out.setdefault(name, {"size": size, "keys": []})
        group["keys"].append(key)
    return out


def _owner(key: str, owners: dict) -> str | None:
    """The grouped tensor ``key`` names (itself, or as a run of its dotted parts:
    ``optimizer.state.<fqn>.exp_avg``), or None."""
    if key in owners:
        return key
    parts = key.split(".")
    for start in range(len(parts)):
        for stop in range(len(parts), start, -1):
            candidate = ".".join(parts[start:stop])
            if candidate in owners:
                return candidate
    return None


def describe(groups: dict[str, dict[str, Any]]) -> str:
    """ "36 tensors of 8 experts" (empty for none)."""
    return "; ".join(f"{len(group['keys'])} tensors of {group['size']} {name}" for name, group in groups.items())


def load_problems(flat: dict[str, torch.Tensor], metadata, manifest: dict | None, state_keys) -> list[str]:
    """Every tensor of a load's target that the checkpoint (DCP metadata) cannot fill whole, named."""
    saved = metadata.state_dict_metadata
    recorded = grouped_record(manifest)
    counts = {name: sum(1 for group, _ in recorded.values() if group == name) for name, _ in recorded.values()}
    problems = []
    for key, tensor in flat.items():
        item = saved.get(key)
        what = "key" if key.split(".", 1)[0] in state_keys else "model key"
        member = ""
        if key in recorded:
            name, size = recorded[key]
            member = f" (one of the {counts[name]} tensors of {size} {name} the step's manifest counts)"
        if item is None:
            problems.append(f"{what} {key!r} is missing{member}")
        elif not isinstance(item, TensorStorageMetadata):
            problems.append(f"{what} {key!r} is not stored as a tensor")
        elif tuple(item.size) != tuple(tensor.shape):
            zero = " (zero-length)" if 0 in tuple(item.size) else ""
            problems.append(f"{key}: checkpoint shape {tuple(item.size)}{zero} != model shape {tuple(tensor.shape)}")
        else:
            missing, rows = coverage_gap(item)
            if missing:
                name = recorded.get(key, ("rows",))[0]
                problems.append(f"{key}: {missing} elements were never stored ({name} {index_ranges(rows)})")
    return problems
