from cairn.distributed.parallel_dims import ParallelDims
from cairn.distributed.utils import init_distributed

__all__ = ["ParallelDims", "init_distributed"]
