"""Run a function on N real gloo ranks (one process each) from a test.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes, sets the
torchrun environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT`` on a free port), joins the gloo group, calls ``fn(rank, world_size, *args)``
and returns every rank's return value (which must pickle), in rank order. The first worker
failure is re-raised in the test with the worker's traceback; a hang ends with
``TimeoutError`` after ``timeout_s``.

Processes are forked where possible (Linux): no re-import of torch per rank, and ``fn``
may be any callable, a closure included. ``start_method="spawn"`` needs ``fn`` importable
at module level.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys
import tempfile
import time
from typing import Any, Callable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0,
                    init_process_group: bool = True, start_method: str | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return each rank's result.

    ``init_process_group=False`` leaves joining the group to ``fn`` (for code that calls
    ``cairn.distributed.init_distributed()`` itself; the env vars are set either way).
    """
    import torch.multiprocessing as mp

    start_method = start_method or os.environ.get("CAIRN_TEST_START_METHOD") or (
        "fork" if sys.platform == "linux" else "spawn")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="cairn-dist-") as result_dir:
        context = mp.start_processes(_worker, args=(fn, world_size, port, result_dir, init_process_group, timeout_s,
                                                    args),
                                     nprocs=world_size, join=False, start_method=start_method)
        deadline = time.monotonic() + timeout_s
        # join() raises ProcessRaisedException / ProcessExitedException for the first failure
        # and terminates the other ranks.
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                for process in context.processes:
                    if process.is_alive():
                        process.terminate()
                raise TimeoutError(f"distributed test did not finish within {timeout_s:.0f} s "
                                   f"({fn.__name__} on {world_size} ranks)")
        results = []
        for rank in range(world_size):
            with open(os.path.join(result_dir, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results


def _worker(rank: int, fn, world_size: int, port: int, result_dir: str, init_process_group: bool,
            timeout_s: float, args: tuple) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    # The ranks share a few cores: more intra-op threads would only contend.
    torch.set_num_threads(1)
    if init_process_group:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    try:
        result = fn(rank, world_size, *args)
        with open(os.path.join(result_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
