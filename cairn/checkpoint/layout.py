"""What the names in a checkpoint folder mean, the kinds of step, and dtypes by name.

A leaf of the checkpoint package: every other module asks here what ``step-12``,
``.tmp-step-12-hf`` or ``.trash-step-3-9f2c`` is, instead of matching names itself.

In a checkpoint folder (see docs/design.md for the commit protocol)::

    step-<N>/                  a committed step; the only names readers look at
    .tmp-step-<N>[-<tag>]/     staging dir of a save in flight, or the leftover of a crashed one
    .trash-<name>-<id>/        a step being deleted (renamed away first, then removed)
    .replaced-step-<N>/        the previous step-N while a replace falls back to two renames

What a crash can leave behind (in a folder or in object storage) is described by ``Leftover``.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a dtype is asked for: the CLI's parser imports this module
    import torch

MANIFEST_NAME = "cairn_manifest.json"
METADATA_NAME = ".metadata"  # DCP's own name for its metadata file
HF_INDEX_NAME = "model.safetensors.index.json"
SAVE_ID_PREFIX = "cairn-"  # marks DCP metadata written by cairn, so a deleted manifest is noticed
TRASH_PREFIX = ".trash-"
LEASE_NAME = ".cairn-lease.json"  # the lease object under an s3:// prefix
_LEASE_GENERATION_RE = re.compile(r"^\.cairn-lease-(\d+)\.json$")  # a POSIX folder's lease: one file per generation

# What a step holds (the manifest's "kind").
FULL, MODEL_ONLY, SEED, HF = "full", "model_only", "seed", "hf"
KINDS = (FULL, MODEL_ONLY, SEED, HF)
# The groups of keys of a cairn trainer's full checkpoint (model FQNs sit at the top level).
GROUPS = ("model", "optimizer", "lr_scheduler", "dataloader", "train_state", "rng")

def lease_name(generation: int) -> str:
    """The file of one generation of a POSIX folder's lease (``local.LocalStore``); generation -1
    is the one file earlier cairn versions renewed in place (``LEASE_NAME``): a run of such a
    version is seen, and its lease replaced by generation 0 once it is gone."""
    return LEASE_NAME if generation == -1 else f".cairn-lease-{generation}.json"


def lease_generation(name: str) -> int | None:
    if name == LEASE_NAME:
        return -1
    match = _LEASE_GENERATION_RE.match(name)
    return int(match.group(1)) if match else None


_STEP_RE = re.compile(r"^step-(\d+)$")
_STAGING_RE = re.compile(r"^\.tmp-step-(\d+)(?:-.+)?$")
_ASIDE_RE = re.compile(r"^\.replaced-step-(\d+)$")
_TRASH_STEP_RE = re.compile(r"step-(\d+)")


def step_name(step: int) -> str:
    return f"step-{step}"


def staging_name(step: int, tag: str | None = None) -> str:
    return f".tmp-step-{step}" + (f"-{tag}" if tag else "")


def aside_name(step: int) -> str:
    return f".replaced-step-{step}"


def step_of(name: str) -> int | None:
    """N for ``step-N``, else None."""
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


def staging_step(name: str) -> int | None:
    """N for ``.tmp-step-N`` or ``.tmp-step-N-<tag>``, else None."""
    match = _STAGING_RE.match(name)
    return int(match.group(1)) if match else None


def aside_step(name: str) -> int | None:
    """N for ``.replaced-step-N``, else None."""
    match = _ASIDE_RE.match(name)
    return int(match.group(1)) if match else None


def trash_step(name: str) -> int | None:
    """N for a ``.trash-...step-N...`` name, else None (also None for other trash)."""
    if not name.startswith(TRASH_PREFIX):
        return None
    match = _TRASH_STEP_RE.search(name)
    return int(match.group(1)) if match else None


def is_trash(name: str) -> bool:
    return name.startswith(TRASH_PREFIX)


@dataclasses.dataclass
class Leftover:
    """Something a crashed save, delete or probe left in a checkpoint folder; never a committed step.

    ``kind``: ``staging`` (a save's staging dir), ``trash`` (a delete cut short), ``aside``
    (the old copy of a replaced step), ``temp`` (a lease or probe file being written), ``save``
    (objects of a save no commit marker names), ``upload`` (a multipart upload never completed),
    ``foreign`` (a ``step-N`` dir without a manifest or DCP metadata: not cairn's, so listed and
    never removed). ``location`` is a path or URI; sizes and times where known."""

    kind: str
    location: str
    step: int | None
    why: str
    num_bytes: int | None = None
    num_files: int | None = None
    created: float | None = None

    @property
    def removable(self) -> bool:
        return self.kind != "foreign"

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"removable": self.removable}


# --- dtypes by name ------------------------------------------------------------------------------

# Dtypes a user may name for an export (Config.export_dtype, convert --export_dtype).
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def steps_to_purge(steps: list[int], keep_latest_k: int, protect=()) -> list[int]:
    """The committed ``steps`` (ascending) that retention removes: all but the newest
    ``keep_latest_k`` and those in ``protect``; none when ``keep_latest_k`` is 0 (keep all)."""
    if keep_latest_k < 0:
        raise ValueError(f"keep_latest_k must be >= 0, got {keep_latest_k}")
    if keep_latest_k == 0:
        return []
    keep = set(steps[-keep_latest_k:]) | set(protect)
    return [step for step in steps if step not in keep]


def dtype_named(name: str | torch.dtype) -> torch.dtype:
    """``torch.bfloat16`` for "bfloat16" (or "torch.bfloat16", or the dtype itself); ValueError
    naming the value for anything that is not a torch dtype."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    resolved = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype (e.g. {', '.join(EXPORT_DTYPES)})")
    return resolved


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for ``torch.bfloat16``: how manifests and messages spell a dtype."""
    return str(dtype).removeprefix("torch.")


def cast_dtype(dtype: torch.dtype, export_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a tensor of ``dtype`` has in an export cast to ``export_dtype`` (floats only)."""
    return export_dtype if export_dtype is not None and dtype.is_floating_point else dtype
