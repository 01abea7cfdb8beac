"""What a load or a save did, as the manager and the plain functions return it.

Two small frozen records with the same words everywhere: ``LoadResult`` (the step restored,
from which tier and place, the steps a crash lost where that is known) is what
``CheckpointManager.load()`` and the plain ``load()`` return; ``SaveResult`` (what happened to
this step's save, and why) is what ``CheckpointManager.save()`` returns after every step.
``record()`` gives each as a flat JSON-able dict for metrics (``metrics.jsonl``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

# Where a load came from: a local or shared folder, object storage, host memory (this node's
# snapshot, or with some ranks' state from the next node's replica), or nowhere.
Tier = Literal["disk", "object", "memory", "replica", "none"]

# What save() did with this step: nothing was due (skipped); the step is committed (saved); an
# async save was staged and is being written in the background (started); it came due while
# the previous save was still being written and is postponed (deferred) or staged to be written
# next (coalesced).
SaveAction = Literal["skipped", "saved", "started", "deferred", "coalesced"]


@dataclasses.dataclass(frozen=True)
class LoadResult:
    """What a load restored. True when something was loaded.

    ``step``: the step restored (None for weights that belong to no step of this run: an
    initial checkpoint or Hugging Face weights); ``tier``: "disk", "object", "memory",
    "replica" or "none"; ``source``: the step's folder or URI (the snapshot folder for memory);
    ``kind``: "full", "model_only", "hf", "seed", "initial"; ``steps_lost``: how many steps the
    previous run had trained past ``step`` (known from the memory tier's progress record, else
    None); ``bytes``: tensor bytes this rank loaded; ``details``: the rest (load phases, ranks
    restored from replicas, ...)."""

    step: int | None
    tier: Tier
    source: str | None = None
    kind: str | None = None
    steps_lost: int | None = None
    seconds: float = 0.0
    bytes: int = 0
    explicit: bool = False
    details: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __bool__(self) -> bool:
        return self.tier != "none"

    def record(self) -> dict[str, Any]:
        """The metrics record of this load (``from_step`` and ``path`` as metrics.jsonl has always named them)."""
        out = {"kind": self.kind, "from_step": self.step, "path": self.source, "tier": self.tier,
               "bytes": self.bytes, "seconds": self.seconds, "explicit": self.explicit,
               "steps_lost": self.steps_lost, **self.details}
        return {key: value for key, value in out.items() if value is not None}


NOTHING_LOADED = LoadResult(step=None, tier="none")


@dataclasses.dataclass(frozen=True)
class SaveResult:
    """What ``save(step)`` did. True when this call took a save (``saved`` or ``started``).

    ``action`` and ``reason`` say what and why; ``step`` is the step whose state it concerns;
    ``kind``: "full", "model_only", "hf"; ``location``: where the step goes; ``stall_s``: how
    long the call held training, ``waited_s`` of it waiting for the previous save
    (``when_busy="wait"``); ``late_by``: steps between a deferred save coming due and being
    taken; ``replaced_step``: the older staged state a coalesced one replaced (never written);
    ``steps_at_risk``: steps since the newest committed full step, which a crash now would lose;
    ``handle``: the save's ``SaveHandle`` (``handle.result()`` waits until it is committed);
    ``memory``: the record of the memory tier's snapshot of the step before, reported with this
    step (its ``stall_s`` is how much longer this step took); ``lost_saves``: saves whose writer
    process died, found by this call (``{"step", "why"}`` each; training went on); ``grouped``:
    the grouped tensors (experts) the save counted, e.g. "36 tensors of 8 experts"."""

    step: int
    action: SaveAction
    reason: str
    kind: str | None = None
    location: str | None = None
    stall_s: float = 0.0
    waited_s: float = 0.0
    late_by: int = 0
    replaced_step: int | None = None
    steps_at_risk: int | None = None
    bytes: int = 0
    handle: Any = dataclasses.field(default=None, compare=False, repr=False)
    memory: dict[str, Any] | None = None
    lost_saves: tuple[dict[str, Any], ...] = ()
    grouped: str | None = None

    def __bool__(self) -> bool:
        return self.action in ("saved", "started")

    @property
    def is_async(self) -> bool:
        return self.action == "started"

    def record(self) -> dict[str, Any]:
        """The metrics record of this save (without the memory snapshot, which is a record of its own)."""
        out: dict[str, Any] = {"action": self.action, "reason": self.reason, "kind": self.kind,
                               "location": self.location, "bytes": self.bytes or None, "stall_s": self.stall_s,
                               "waited_s": self.waited_s or None, "async": self.is_async,
                               "deferred_steps": self.late_by or None, "replaced_step": self.replaced_step,
                               "steps_at_risk": self.steps_at_risk, "grouped": self.grouped}
        if self.action in ("deferred", "coalesced"):
            out["due_step"] = self.step
        return {key: value for key, value in out.items() if value is not None}
