from cairn.optim.lr_scheduler import LRSchedulersContainer, build_lr_schedulers
from cairn.optim.optimizer import OptimizersContainer, build_optimizers, clip_grad_norm_

__all__ = ["OptimizersContainer", "build_optimizers", "clip_grad_norm_", "LRSchedulersContainer",
           "build_lr_schedulers"]
