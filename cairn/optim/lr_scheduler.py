"""Warmup, then a stable phase, then decay: a pure function of the step.

The state is the step count alone, so it is tiny, safe to unpickle with ``weights_only``,
and a resumed run recomputes exactly the learning rates of an uninterrupted one.
"""

from __future__ import annotations

import functools
import math

from torch.distributed.checkpoint.stateful import Stateful
from torch.optim.lr_scheduler import LambdaLR

from cairn.config.job_config import LRSchedulerSection


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, decay_ratio: float | None,
              decay_type: str, min_lr_factor: float) -> float:
    """Multiplier of the peak lr for the optimizer step with 0-based index ``step``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    after_warmup = max(total_steps - warmup_steps, 0)
    decay_steps = after_warmup if decay_ratio is None else round(after_warmup * decay_ratio)
    stable_end = warmup_steps + (after_warmup - decay_steps)
    if step < stable_end or decay_steps == 0:
        return 1.0
    progress = min((step - stable_end + 1) / (decay_steps + 1), 1.0)
    if decay_type == "linear":
        curve = 1.0 - progress
    elif decay_type == "sqrt":
        curve = 1.0 - math.sqrt(progress)
    else:
        curve = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_factor + (1.0 - min_lr_factor) * curve


class LRSchedulersContainer(Stateful):
    def __init__(self, optimizers, config: LRSchedulerSection, total_steps: int):
        self.factor = functools.partial(lr_factor, warmup_steps=config.warmup_steps, total_steps=total_steps,
                                        decay_ratio=config.decay_ratio, decay_type=config.decay_type,
                                        min_lr_factor=config.min_lr_factor)
        self.schedulers = [LambdaLR(opt, self.factor) for opt in optimizers.optimizers]

    @property
    def last_lr(self) -> float:
        return self.schedulers[0].get_last_lr()[0]

    def step(self) -> None:
        for scheduler in self.schedulers:
            scheduler.step()

    def state_dict(self) -> dict:
        return {"last_epoch": self.schedulers[0].last_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        last_epoch = int(state_dict["last_epoch"])
        for scheduler in self.schedulers:
            scheduler.last_epoch = last_epoch
            lrs = [base * self.factor(last_epoch) for base in scheduler.base_lrs]
            for group, lr in zip(scheduler.optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs


def build_lr_schedulers(optimizers, config: LRSchedulerSection, total_steps: int) -> LRSchedulersContainer:
    return LRSchedulersContainer(optimizers, config, total_steps)
