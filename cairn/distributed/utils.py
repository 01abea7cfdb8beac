"""Process group and device setup, for torchrun (env://) or a plain single process."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(timeout_s: int = 600) -> tuple[torch.device, int, int]:
    """Join (or create, for a single process) the default process group.

    Returns (device, rank, world_size). CUDA hosts use NCCL with one GPU per LOCAL_RANK;
    CPU machines use gloo. A single process without torchrun gets a world of one.
    """
    dtype = device_type()
    if dtype == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "cuda:nccl,cpu:gloo"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        if "RANK" not in os.environ:  # plain `python -m cairn.train`: a world of one
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                                device_id=device if dtype == "cuda" else None)
    return device, dist.get_rank(), dist.get_world_size()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_mean(value: torch.Tensor, group=None) -> float:
    """Mean of a scalar over a process group (None: the default group)."""
    value = value.detach().float().reshape(1).clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value.item() / dist.get_world_size(group)


def dist_max(value: float, group=None) -> float:
    t = torch.tensor([float(value)])
    if torch.cuda.is_available() and dist.get_backend(group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()
