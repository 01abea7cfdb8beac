"""Pipeline parallelism, model-independent: stage layout, schedule construction, one step.

A model's ``pipeline`` function (``pipeline_llama``) cuts its model into stage modules;
this module decides which stages a rank owns, which layers each stage holds, and wraps
``torch.distributed.pipelining``'s schedules so that a pipelined step computes the same
loss and gradients as one process running the whole local batch.

Loss scaling: the schedule runs ``loss_fn`` once per microbatch. ``loss_fn`` is a mean
over its microbatch, so each microbatch loss is divided by the number of microbatches
before its backward, and the schedule's own gradient scaling is switched off
(``scale_grads=False``). The schedule's scaling divides every ``.grad`` of the stage after
each ``step``, so with gradient accumulation (several ``step`` calls per optimizer step) it
would divide the earlier steps' gradients again; a scaled loss has no such history.
Consequence for callers: the ``losses`` a schedule step fills are already divided by the
number of microbatches; their **sum** is the batch mean (``PipelineParts.step`` returns it).
Data parallelism then averages over the dp ranks as usual.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

SCHEDULES = ("1F1B", "GPipe", "Interleaved1F1B")
# Interleaved schedules run several (looped) stages per rank; the others one.
_STAGES_PER_RANK = {"1F1B": 1, "GPipe": 1, "Interleaved1F1B": 2}


def stages_per_rank(schedule_name: str) -> int:
    if schedule_name not in _STAGES_PER_RANK:
        raise ValueError(f"--parallelism.pipeline_parallel_schedule must be one of {', '.join(SCHEDULES)} "
                         f"(got {schedule_name!r})")
    return _STAGES_PER_RANK[schedule_name]


def stage_ids_for_rank(pp_rank: int, pp_degree: int, num_stages_per_rank: int) -> list[int]:
    """Looped assignment: rank r owns stages r, r + pp, r + 2 pp, ... (what interleaved schedules expect)."""
    return [pp_rank + k * pp_degree for k in range(num_stages_per_rank)]


def split_layers(layer_ids: list[str], num_stages: int) -> list[list[str]]:
    """Contiguous, near-equal runs of layers; the earlier stages take one extra layer each when
    the count does not divide (the last stage already carries the norm, output and loss)."""
    base, extra = divmod(len(layer_ids), num_stages)
    out, start = [], 0
    for stage in range(num_stages):
        size = base + (1 if stage < extra else 0)
        out.append(layer_ids[start:start + size])
        start += size
    return out


def num_microbatches(local_batch_size: int, microbatch_size: int) -> int:
    if microbatch_size < 1 or local_batch_size % microbatch_size:
        raise ValueError(f"--training.local_batch_size ({local_batch_size}) must be a multiple of "
                         f"--parallelism.pipeline_parallel_microbatch_size ({microbatch_size})")
    return local_batch_size // microbatch_size


def schedule_problems(schedule_name: str, n_microbatches: int, pp_degree: int) -> list[str]:
    """What torch's schedules would reject, said in terms of the flags that set it."""
    flags = ("--training.local_batch_size / --parallelism.pipeline_parallel_microbatch_size "
             f"= {n_microbatches} microbatches")
    if schedule_name == "1F1B" and n_microbatches < pp_degree:
        return [f"{flags}, but the 1F1B schedule needs at least --parallelism.pipeline_parallel_degree "
                f"({pp_degree}) of them"]
    if schedule_name == "Interleaved1F1B":
        rounds = max(1, n_microbatches // pp_degree)
        if n_microbatches % rounds:
            return [f"{flags}, but Interleaved1F1B needs a count that is below "
                    f"--parallelism.pipeline_parallel_degree ({pp_degree}) or a multiple of it"]
    return []


class MicrobatchMeanLoss:
    """``loss_fn(pred, target) / n_microbatches``: summing the microbatch losses gives the batch mean."""

    def __init__(self, loss_fn: Callable[..., torch.Tensor], n_microbatches: int):
        self.loss_fn = loss_fn
        self.n_microbatches = n_microbatches

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.loss_fn(pred, target, **kwargs) / self.n_microbatches


def build_schedule(stages: list, schedule_name: str, n_microbatches: int,
                   loss_fn: Callable[..., torch.Tensor]):
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

    scaled_loss = MicrobatchMeanLoss(loss_fn, n_microbatches)
    if schedule_name == "Interleaved1F1B":
        return ScheduleInterleaved1F1B(stages, n_microbatches=n_microbatches, loss_fn=scaled_loss,
                                       scale_grads=False)
    if len(stages) != 1:
        raise ValueError(f"the {schedule_name} schedule runs one stage per rank, got {len(stages)}")
    schedule_class = {"1F1B": Schedule1F1B, "GPipe": ScheduleGPipe}[schedule_name]
    return schedule_class(stages[0], n_microbatches=n_microbatches, loss_fn=scaled_loss, scale_grads=False)


@dataclass
class PipelineParts:
    """What ``pipeline_<model>`` returns: this rank's stage modules and the schedule that runs them."""

    schedule: Any
    """A ``torch.distributed.pipelining`` schedule over this rank's stages."""
    model_parts: list[nn.Module]
    """This rank's stage modules, in stage order; parameter FQNs are the whole model's."""
    has_first_stage: bool
    """This rank feeds the input tokens (owns stage 0)."""
    has_last_stage: bool
    """This rank computes the loss (owns the last stage)."""
    n_microbatches: int = 1
    stage_ids: tuple[int, ...] = ()

    def step(self, inputs: torch.Tensor | None, labels: torch.Tensor | None) -> torch.Tensor | None:
        """Forward and backward of one local batch through the pipeline; gradients accumulate.

        ``inputs`` are used on the first stage and ``labels`` on the last (others may pass
        None). Returns the batch's mean loss (detached) where this rank owns the last stage,
        else None: broadcast it over the pp group if every rank must log it.
        """
        targets = labels if self.has_last_stage else None
        losses: list[torch.Tensor] | None = [] if self.has_last_stage else None
        args = (inputs,) if self.has_first_stage else ()
        self.schedule.step(*args, target=targets, losses=losses, **self._step_kwargs())
        if not self.has_last_stage:
            return None
        # Each microbatch loss was divided by n_microbatches (MicrobatchMeanLoss): the sum is the mean.
        return torch.stack([loss.detach() for loss in losses]).sum()

    def _step_kwargs(self) -> dict:
        # Not keeping the merged logits saves a full batch of vocab-sized outputs; the
        # argument is missing from older releases.
        if "return_outputs" in inspect.signature(self.schedule.step).parameters:
            return {"return_outputs": False}
        return {}
