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
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend=backend, timeout=timeout, device_id=device if dtype == "cuda" else None,
                                **_restart_safe_store(timeout))
    return device, dist.get_rank(), dist.get_world_size()


def _restart_safe_store(timeout: datetime.timedelta) -> dict:
    """Under torchrun, a store whose keys are private to this restart attempt.

    torchrun's workers share the agent's TCPStore across ``--max-restarts`` attempts without
    a per-attempt prefix: a restarted rank can read the address a killed rank published in
    the previous attempt and fail to connect (seen with gloo on torch 2.13). Prefixing the
    keys with the restart count makes every attempt rendezvous afresh.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    world_size = int(os.environ["WORLD_SIZE"])
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timeout)
    return {"store": dist.PrefixStore(f"/cairn/attempt_{attempt}", store), "rank": int(os.environ["RANK"]),
            "world_size": world_size}


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
