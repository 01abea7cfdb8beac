"""What checkpointing costs a training run, next to what the machine allows.

One command measures, in the same run, on the machine it runs on (CPU/gloo, or 1..N
GPUs/NCCL under torchrun):

- ceilings: device -> pinned host copy bandwidth per GPU, alone and all GPUs at once (host
  memcpy on a CPU-only machine); fsync'd sequential write and cold read bandwidth of the
  checkpoint disk (``--folder``), one rank alone and all ranks at once (the write the faster
  of a plain one and one that starts the disk's writeback as it goes, as cairn's writer does);
- for cairn's real ``Trainer`` and ``CheckpointManager``, in each async mode (disabled,
  async, async_with_pinned_mem): the time ``save()`` blocks, the training stall (extra step
  time around a save against steps with no save in flight), staging time, time to the
  durable commit, host memory (new pinned allocations per save, buffer bytes against the
  rank's shard, RSS over ``--rss-saves`` saves), then the cold load time in the same
  layout and, in a separate torchrun, the cold load-and-reshard time into another layout;
  checksum overhead (save with / without xxh3 checksums, load with / without ``verify``);
- the same for torchtitan's ``CheckpointManager`` built around the same model parts,
  optimizers and LR schedulers, when ``import torchtitan`` works (else the reason is
  recorded).

It prints a table of absolute figures and the ratios the checkpoint issue targets, and
writes everything as JSON (``--out``). Every other flag is a normal cairn flag
(``--parallelism.tensor_parallel_degree 2``, ``--training.local_batch_size 4``, ...).

    python benchmarks/checkpoint_bench.py --flavor tiny --out /tmp/bench.json
    torchrun --standalone --nproc_per_node 4 benchmarks/checkpoint_bench.py --flavor 1B \\
        --parallelism.data_parallel_shard_degree 4 --folder /data/ckpt_bench --out bench_1B_4gpu.json

Definitions (all times wall clock, CUDA work synchronized on the training stream):
- stall of one save = time ``save()`` blocks + the sum of the step times of the steps after
  it (at least ``--steps``, more until the save is durable, at most ``--max-window-steps``)
  - that many times the median of the ``--steps`` steps just before it and as many once it is
  durable (no save in flight); median over the saves, slowest rank. The JSON and the table give
  how far step-time drift alone moves one save's estimate (``stall_noise_s``): steps bound by
  the GPU (a batch that keeps it busy) make it small, launch-bound steps do not;
- staging time = from ``save()`` until the host copy of the state is complete;
- time to durable commit = from ``save()`` until the step directory is published (data,
  metadata and manifest fsynced, renamed into place) — for torchtitan, until its save
  future completes;
- cold = page cache dropped first (``/proc/sys/vm/drop_caches`` when root and allowed,
  else ``posix_fadvise(DONTNEED)`` on the files; the JSON says which).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout run without `pip install -e .`

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from disk_io import CHUNK, evict, files_under, read_file, try_drop_caches, write_file  # noqa: E402  (benchmarks/)

MODES = ("disabled", "async", "async_with_pinned_mem")
PINNED = "async_with_pinned_mem"
# A cairn mode may carry variants after "+": snapshot / nosnapshot (--checkpoint.device_snapshot
# on / off; neither: the default, auto), thread or process (--checkpoint.async_writer), e.g.
# async_with_pinned_mem+snapshot.
VARIANTS = {"snapshot": {"device_snapshot": "on"}, "nosnapshot": {"device_snapshot": "off"},
            "thread": {"async_writer": "thread"}, "process": {"async_writer": "process"}}
# Variables torchrun sets for its workers: a nested torchrun must not inherit them.
_LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
               "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
               "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE",
               "TORCHELASTIC_ERROR_FILE", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "OMP_NUM_THREADS_SET")


# --- arguments ------------------------------------------------------------------------------

def parse_bench_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(benchmark options, cairn flags): every flag not listed here goes to cairn's parser."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--flavor", default="debugmodel",
                        help="model flavor (--model.flavor): a llama3 one, or with --module qwen3 a qwen3 one")
    parser.add_argument("--steps", type=int, default=8,
                        help="steps timed before each save and again once it is durable (its baseline), and at "
                             "least this many after it (stall window)")
    parser.add_argument("--saves", type=int, default=3, help="measured saves per mode (medians are over these)")
    parser.add_argument("--rss-saves", type=int, default=20,
                        help="saves in async_with_pinned_mem mode over which host RSS and pinned allocations "
                             "are tracked")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before anything is measured")
    parser.add_argument("--max-window-steps", type=int, default=200,
                        help="stop extending a stall window after this many steps even if the save is not durable")
    parser.add_argument("--loads", type=int, default=2,
                        help="cold loads per variant (verify on/off); 0 skips the loads and the reshard run")
    parser.add_argument("--folder", default="outputs/checkpoint_bench",
                        help="where checkpoints and ceiling files are written: put it on the checkpoint disk")
    parser.add_argument("--out", default="checkpoint_bench.json", help="JSON results (written by rank 0)")
    parser.add_argument("--ceiling-mb", type=int, default=0,
                        help="MB per rank for the bandwidth ceilings; 0: the rank's shard size, clamped to 256..2048")
    parser.add_argument("--drop-caches", choices=("auto", "never"), default="auto",
                        help="auto: write /proc/sys/vm/drop_caches when root and allowed, else fadvise the files")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="cairn async modes to measure, comma-separated; a mode may name variants after '+' "
                             f"({', '.join(VARIANTS)}), e.g. {PINNED}+snapshot")
    parser.add_argument("--torchtitan", choices=("auto", "off"), default="auto",
                        help="auto: measure torchtitan's CheckpointManager side by side when it imports")
    parser.add_argument("--reshard-nproc", type=int, default=0,
                        help="processes of the load-and-reshard run; 0: a default layout (see --reshard-args)")
    parser.add_argument("--reshard-args", default=None,
                        help="cairn parallelism flags of the reshard run, as one string; default: TP 2 x FSDP "
                             "(or pure FSDP) on the same world size, 2-way FSDP for a 1-process CPU run")
    parser.add_argument("--torchtitan-modes", default=",".join(MODES),
                        help="torchtitan async modes to measure, comma-separated")
    parser.add_argument("--checksum-pairs", type=int, default=-1,
                        help="measured sync saves followed by one without checksums (overhead figure); "
                             "-1: all of them")
    parser.add_argument("--sync-warmup-saves", type=int, default=2,
                        help="unmeasured saves at the start of the synchronous mode: its first save also pins "
                             "host memory (DCP's copies through the caching host allocator), which no later "
                             "save repeats, and the next one was still slower on the H200 host (v6 in "
                             "RESULTS.md); neither may enter the sync save time or the checksum pairs")
    parser.add_argument("--keep-steps", type=int, choices=(0, 1), default=1,
                        help="committed steps left on disk while the next save is written: 0 deletes the last "
                             "one first (a disk that holds one checkpoint of a large flavor)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints under --folder afterwards")
    parser.add_argument("--child-load", default=None, help=argparse.SUPPRESS)  # internal: reshard child
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-global-batch", type=int, default=0, help=argparse.SUPPRESS)
    args, cairn_argv = parser.parse_known_args(argv)
    return args, cairn_argv


def cairn_flags(args: argparse.Namespace, cairn_argv: list[str], dump_folder: Path) -> list[str]:
    """The cairn command line of the benchmark's Trainer: the user's flags win over these defaults."""
    given = {a.split("=", 1)[0] for a in cairn_argv if a.startswith("--")}
    defaults = {"--module": "llama3", "--config": "llama3_debugmodel", "--debug.log_level": "WARNING",
                "--training.steps": "1000000"}  # a long LR schedule: the benchmark never reaches its end
    flags = [x for key, value in defaults.items() if key not in given for x in (key, value)]
    return flags + list(cairn_argv) + ["--model.flavor", args.flavor, "--job.dump_folder", str(dump_folder)]


def without_parallelism(argv: list[str]) -> list[str]:
    """``argv`` less its ``--parallelism.*`` flags (and their values)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("--parallelism."):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out


# --- small helpers ----------------------------------------------------------------------------

def sync() -> None:
    """Wait for the training stream only: a side stream's staging copies must not be counted."""
    if torch.cuda.is_available():
        torch.cuda.current_stream().synchronize()


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def gather(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_true(flag: bool) -> bool:
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    value = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def host_allocator_stats() -> dict[str, float]:
    """CUDA's caching host (pinned) allocator counters, where this torch has them."""
    if not torch.cuda.is_available() or not hasattr(torch.cuda, "host_memory_stats"):
        return {}
    try:
        stats = torch.cuda.host_memory_stats()
    except Exception:  # noqa: BLE001 - an optional counter must never stop the benchmark
        return {}
    keep = ("num_host_alloc", "num_host_free", "allocations.current", "allocated_bytes.current",
            "reserved_bytes.current", "segment.current", "host_alloc_time.total")
    return {k: float(v) for k, v in stats.items() if k in keep or k.startswith("allocated_bytes")}


# --- page cache ---------------------------------------------------------------------------------

def drop_page_cache(files: list[Path], policy: str) -> str:
    """Make the next read of ``files`` come from the disk; returns the method used (on every rank).

    Each host's local rank 0 tries ``drop_caches`` (it needs root and a writable /proc); if any
    host could not, every rank evicts the files with ``posix_fadvise(DONTNEED)`` instead.
    """
    tried = policy == "auto" and int(os.environ.get("LOCAL_RANK", 0)) == 0 and os.geteuid() == 0
    outcomes = [o for o in gather(try_drop_caches() if tried else None) if o is not None]
    if outcomes and all(outcomes):
        return "drop_caches"
    evict(files)  # any rank may read any file, so each evicts them all
    dist.barrier()
    return "posix_fadvise(DONTNEED)"


# --- ceilings -------------------------------------------------------------------------------------

def _device_sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _copy_bandwidth(nbytes: int, repeats: int = 5) -> dict[str, float]:
    """Device -> pinned host (CUDA), or host -> host (CPU), GB/s; plus the cost of the buffers."""
    if torch.cuda.is_available():
        src = torch.ones(nbytes, dtype=torch.uint8, device="cuda")
        start = time.perf_counter()
        dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        pin_s = time.perf_counter() - start
        fresh = torch.empty(nbytes, dtype=torch.uint8)
        torch.cuda.synchronize()
        start = time.perf_counter()
        fresh.copy_(src)
        fresh_gbps = nbytes / (time.perf_counter() - start) / 1e9
    else:
        src = torch.ones(nbytes, dtype=torch.uint8)
        start = time.perf_counter()
        fresh = torch.empty(nbytes, dtype=torch.uint8)
        fresh.copy_(src)
        fresh_gbps = nbytes / (time.perf_counter() - start) / 1e9
        dst, pin_s = fresh, None
    times = []
    for _ in range(repeats + 1):
        _device_sync()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        _device_sync()
        times.append(time.perf_counter() - start)
    best = nbytes / statistics.median(times[1:]) / 1e9
    return {"gbps": best, "fresh_pageable_gbps": fresh_gbps, "pin_alloc_s": pin_s, "bytes": nbytes}


def copy_ceilings(nbytes: int) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    alone = None
    for turn in range(world):  # each rank alone, the others waiting
        dist.barrier()
        if rank == turn:
            alone = _copy_bandwidth(nbytes)
    dist.barrier()
    together = _copy_bandwidth(nbytes)
    per_rank = gather({"alone": alone, "together": together})
    kind = "device->pinned host (cudaMemcpyAsync D2H)" if torch.cuda.is_available() else \
        "host memcpy (no GPU: staging is a host copy)"
    return {"kind": kind, "bytes_per_rank": nbytes, "per_rank": per_rank,
            "alone_gbps_min": min(r["alone"]["gbps"] for r in per_rank),
            "together_gbps_per_rank_min": min(r["together"]["gbps"] for r in per_rank),
            "together_gbps_total": sum(r["together"]["gbps"] for r in per_rank),
            "fresh_pageable_gbps_min": min(r["alone"]["fresh_pageable_gbps"] for r in per_rank),
            "pin_alloc_s_max": max((r["alone"]["pin_alloc_s"] or 0.0) for r in per_rank) if
            torch.cuda.is_available() else None}


def _disk_round(folder: Path, nbytes: int, writers: set[int], block: bytes, cache_policy: str) -> dict[str, Any]:
    """Ranks in ``writers`` write (fsync) their file at once, then read it back cold."""
    rank = dist.get_rank()
    path = folder / f"rank{rank}.bin"
    dist.barrier()
    # Twice: as a plain program writes (the kernel starts writing back late: all but the start
    # of a file waits for the fsync) and with writeback started as the bytes go out; the
    # ceiling is the faster of the two, so cairn's writer, which does the latter, is held to it.
    wrote = write_file(path, nbytes, block) if rank in writers else None
    dist.barrier()
    wrote_streamed = write_file(path, nbytes, block, writeback=True) if rank in writers else None
    dist.barrier()
    method = drop_page_cache([folder / f"rank{r}.bin" for r in writers], cache_policy)
    read_s = read_file(path) if rank in writers else None
    dist.barrier()
    per_rank = [r for r in gather({"write": wrote, "write_streamed": wrote_streamed, "read_s": read_s})
                if r["read_s"] is not None]
    total = nbytes * len(writers)
    plain = total / max(r["write"]["fsync_s"] for r in per_rank) / 1e9
    streamed = total / max(r["write_streamed"]["fsync_s"] for r in per_rank) / 1e9
    return {"ranks": len(writers), "bytes": total, "cache_drop": method,
            "write_fsync_gbps": max(plain, streamed),
            "write_fsync_plain_gbps": plain, "write_fsync_streamed_gbps": streamed,
            "write_buffered_gbps": total / max(r["write"]["buffered_s"] for r in per_rank) / 1e9,
            "cold_read_gbps": total / max(r["read_s"] for r in per_rank) / 1e9}


def disk_ceilings(folder: Path, nbytes: int, cache_policy: str) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(CHUNK)  # incompressible, in case the disk compresses
    world = dist.get_world_size()
    alone = _disk_round(folder, nbytes, {0}, block, cache_policy)
    together = alone if world == 1 else _disk_round(folder, nbytes, set(range(world)), block, cache_policy)
    (folder / f"rank{dist.get_rank()}.bin").unlink(missing_ok=True)
    dist.barrier()
    return {"folder": str(folder), "bytes_per_rank": nbytes, "rank0_alone": alone, "all_ranks": together,
            "cache_drop": together["cache_drop"]}


# --- the things being measured ------------------------------------------------------------------

class CairnSubject:
    """cairn's CheckpointManager in one async mode, built as the Trainer builds it, through its
    public API: the commit moment comes from the save's handle (``manager.last_save``), the
    checksum switch is ``manager.checksums``."""

    name = "cairn"

    def __init__(self, trainer, mode: str, folder: Path):
        from cairn.checkpoint import CheckpointManager
        from cairn.config.manager import to_dict

        base, *variants = mode.split("+")
        overrides: dict[str, Any] = {}
        for variant in variants:
            if variant not in VARIANTS:
                raise ValueError(f"--modes: unknown variant {variant!r} in {mode!r} (known: {', '.join(VARIANTS)})")
            overrides.update(VARIANTS[variant])
        job = trainer.job_config
        config = dataclasses.replace(job.checkpoint, enable=True, folder=str(folder), interval=1,
                                     keep_latest_k=0, async_mode=base, last_save_model_only=False, load_step=-1,
                                     load_only=False, verify=False, **overrides)
        self.mode = mode
        self.manager = CheckpointManager(
            config, model_parts=trainer.model_parts,
            states={"optimizer": trainer.optimizers, "lr_scheduler": trainer.lr_schedulers,
                    "dataloader": trainer.dataloader, "train_state": trainer.train_state, "rng": trainer.rng},
            base_folder=job.job.dump_folder, model_info={"name": trainer.model_spec.name, "flavor": job.model.flavor},
            run_info={"config": to_dict(job)}, total_steps=job.training.steps, seed=job.debug.seed,
            layout=trainer.parallel_dims.degrees)
        self.folder = Path(self.manager.folder)
        self.local_bytes = 0
        # What a training run does after its first step: the reused staging buffers are allocated
        # (and pinned) in the background long before the first save; here, before it is timed.
        self.manager.prepare_async()
        if self.manager.async_saver is not None:
            self.manager.async_saver.wait()

    @property
    def checksums(self) -> bool:
        return self.manager.checksums

    @checksums.setter
    def checksums(self, value: bool) -> None:
        self.manager.checksums = value

    @property
    def checkpointer(self):
        return self.manager

    def state_dict_seconds(self) -> float:
        """Time to take the state dict ``save()`` hands to staging, on the training thread."""
        start = time.perf_counter()
        state = dict(self.manager.model.state_dict())
        state.update({key: stateful.state_dict() for key, stateful in self.manager.states.items()})
        return time.perf_counter() - start

    @property
    def commit_at(self) -> float | None:
        handle = self.manager.last_save
        return handle.committed_at if handle is not None else None

    def save(self, step: int) -> None:
        self.manager.last_save = None
        info = self.manager.save(step)
        self.local_bytes = info.bytes

    def durable_locally(self) -> bool:
        # Only the coordinator publishes; the others take part in the same collective finish.
        return self.commit_at is not None or dist.get_rank() != 0

    def wait(self) -> None:
        if self.manager.async_saver is not None:
            self.manager.async_saver.wait()

    def hash_wait_seconds(self) -> float | None:
        """Seconds this process's writer spent on checksums beyond its writes (None: the save was
        written in the writer process, or without checksums)."""
        handle = self.manager.last_save
        return handle.hash_wait_s if handle is not None and self.checksums else None

    def load_hash_wait_seconds(self) -> float | None:
        """Seconds the last verifying load's reads, once done, waited for its hashing thread."""
        return self.manager.load_hash_wait_s if self.manager.config.verify else None

    def stage_seconds(self) -> float | None:
        saver = self.manager.async_saver
        return saver.saver.last_stage_seconds if saver is not None else None

    def timeline(self) -> dict[str, float]:
        saver = self.manager.async_saver
        return dict(saver.saver.timeline) if saver is not None else {}

    def memory(self) -> dict[str, Any]:
        saver = self.manager.async_saver.saver if self.manager.async_saver is not None else None
        out: dict[str, Any] = {"rss_bytes": rss_bytes(), "host_allocator": host_allocator_stats()}
        if saver is not None:
            stager = saver.stager
            arena = stager.arena
            out.update(buffer_allocations=stager.allocations, buffer_allocated_bytes=stager.allocated_bytes,
                       buffers_pinned=arena.pinned if arena is not None else stager.pin_memory,
                       buffers_retained_bytes=arena.nbytes if arena is not None and stager.reuse else 0,
                       device_snapshot_bytes=stager.device_allocated_bytes,
                       buffers_prepare_s=saver.prepare_seconds,
                       writer_process_starts=saver.writer_process.starts if saver.writer_process else 0,
                       device_snapshot_mode=stager.snapshot_mode)
        if torch.cuda.is_available():  # what --checkpoint.device_snapshot auto decides from
            free, total = torch.cuda.mem_get_info()
            out.update(device_free_bytes=free, device_total_bytes=total,
                       device_max_reserved_bytes=torch.cuda.max_memory_reserved())
        return out

    def newest_step_dir(self) -> Path | None:
        store = self.manager.store
        steps = store.committed_steps()
        return store.step_dir(steps[-1]) if steps else None

    def keep_newest_only(self) -> None:
        if dist.get_rank() == 0:
            self.manager.store.purge(1)
        dist.barrier()

    def delete_steps(self) -> None:
        if dist.get_rank() == 0:
            for path in self.manager.store.folder.glob("step-*"):
                shutil.rmtree(path)
        dist.barrier()

    def load(self, verify: bool) -> None:
        self.manager.config.verify = verify
        if not self.manager.load():
            raise RuntimeError(f"no committed checkpoint in {self.folder} to load")

    def close(self) -> None:
        self.manager.close()


class TorchtitanSubject:
    """torchtitan's CheckpointManager around the same model parts, optimizers and schedulers."""

    name = "torchtitan"

    def __init__(self, trainer, mode: str, folder: Path):
        from torchtitan.components.checkpoint import CheckpointManager

        config = CheckpointManager.Config(enable=True, folder=str(folder), interval=1, keep_latest_k=0,
                                          async_mode=mode, last_save_model_only=False)
        self.mode = mode
        self.folder = Path(folder)
        self.manager = CheckpointManager(config, dataloader=trainer.dataloader, model_parts=trainer.model_parts,
                                         optimizers=trainer.optimizers, lr_schedulers=trainer.lr_schedulers,
                                         states={"train_state": trainer.train_state, "rng": trainer.rng},
                                         sd_adapter=None, base_folder="")
        self.commit_at: float | None = None
        self.staged_at: float | None = None
        self.saved_at = 0.0
        self.local_bytes = 0

    @property
    def checkpointer(self):
        return self.manager  # the Trainer calls its maybe_wait_for_staging() before each optimizer step

    def save(self, step: int) -> None:
        self.commit_at = self.staged_at = None
        self.saved_at = time.perf_counter()
        self.manager.save(step)
        future = self.manager.save_future
        staging = getattr(self.manager, "staging_future", None)
        if future is None:
            self.commit_at = time.perf_counter()
        else:
            future.add_done_callback(lambda _: setattr(self, "commit_at", time.perf_counter()))
        if staging is not None:
            staging.add_done_callback(lambda _: setattr(self, "staged_at", time.perf_counter()))

    def durable_locally(self) -> bool:
        return self.commit_at is not None

    def wait(self) -> None:
        self.manager.maybe_wait_for_staging()
        self.manager.maybe_wait_for_saving()

    def stage_seconds(self) -> float | None:
        return None if self.staged_at is None else self.staged_at - self.saved_at

    def memory(self) -> dict[str, Any]:
        return {"rss_bytes": rss_bytes(), "host_allocator": host_allocator_stats()}

    def newest_step_dir(self) -> Path | None:
        steps = sorted(int(p.name.split("-")[1]) for p in self.folder.glob("step-*") if (p / ".metadata").exists())
        return self.folder / f"step-{steps[-1]}" if steps else None

    def keep_newest_only(self) -> None:
        if dist.get_rank() == 0:
            newest = self.newest_step_dir()
            for path in self.folder.glob("step-*"):
                if path != newest:
                    shutil.rmtree(path, ignore_errors=True)
        dist.barrier()

    def delete_steps(self) -> None:
        if dist.get_rank() == 0:
            for path in self.folder.glob("step-*"):
                shutil.rmtree(path, ignore_errors=True)
        dist.barrier()

    def load(self, verify: bool) -> None:
        if not self.manager.load():
            raise RuntimeError(f"torchtitan found no checkpoint in {self.folder}")

    def close(self) -> None:
        self.manager.close()


# --- the measuring loop -------------------------------------------------------------------------

# The training loop's garbage collection schedule (--training.gc_freq), entered in main().
COLLECTOR = None


def timed_step(trainer) -> float:
    sync()
    start = time.perf_counter()
    trainer.train_state.step += 1
    if COLLECTOR is not None:
        COLLECTOR.run(trainer.train_state.step)
    trainer.train_step()
    sync()
    return time.perf_counter() - start


def measure_save(trainer, subject, *, min_window: int, max_window: int) -> dict[str, Any]:
    """One save after a step, then steps until at least ``min_window`` and the save is durable."""
    memory_before = subject.memory()
    dist.barrier()
    sync()
    start = time.perf_counter()
    subject.save(trainer.train_state.step)
    sync()
    blocked = time.perf_counter() - start
    window: list[float] = []
    while len(window) < max_window:
        window.append(timed_step(trainer))
        if len(window) >= min_window and all_true(subject.durable_locally()):
            break
    durable_in_window = all_true(subject.durable_locally())
    subject.wait()
    commit_at = subject.commit_at
    return {"step": trainer.train_state.step - len(window), "blocked_s": blocked, "window_s": window,
            "durable_in_window": durable_in_window,
            "durable_s": None if commit_at is None else commit_at - start,
            "stage_s": subject.stage_seconds(), "local_bytes": subject.local_bytes,
            "hash_wait_s": subject.hash_wait_seconds() if hasattr(subject, "hash_wait_seconds") else None,
            "timeline": subject.timeline() if hasattr(subject, "timeline") else {},
            "memory_before": memory_before, "memory_after": subject.memory()}


def run_mode(trainer, subject, args, result: dict[str, Any], *, saves: int, extra_saves: int = 0,
             checksum_toggle: bool = False) -> None:
    """``saves`` measured saves (``checksum_toggle``: each followed by one without checksums),
    then ``extra_saves`` more with one step between, for the memory series. Fills ``result``
    as it goes, so the saves before a failing one are kept."""
    trainer.checkpointer = subject.checkpointer
    if hasattr(subject, "state_dict_seconds"):  # the part of save() that no async mode can hide
        result["state_dict_s"] = median([subject.state_dict_seconds() for _ in range(3)])
    baseline: list[float] = result.setdefault("baseline_step_s", [])
    records: list[dict] = result.setdefault("saves", [])
    pairs = saves if args.checksum_pairs < 0 else min(saves, args.checksum_pairs)
    if checksum_toggle:
        warm: list[dict] = result.setdefault("warmup_saves", [])
        for _ in range(args.sync_warmup_saves):
            if args.keep_steps == 0:
                subject.delete_steps()
            timed_step(trainer)
            record = measure_save(trainer, subject, min_window=1, max_window=max(1, args.max_window_steps))
            warm.append({key: record[key] for key in ("step", "blocked_s", "durable_s")})
            subject.keep_newest_only()
    for i in range(saves + extra_saves):
        # Pairs alternate which goes first, so a first-save cost or a drifting disk favours neither.
        variants = ((True, False) if i % 2 == 0 else (False, True)) if checksum_toggle and i < pairs else (True,)
        for checksums in variants:
            if hasattr(subject, "checksums"):
                subject.checksums = checksums
            if args.keep_steps == 0:
                subject.delete_steps()
            before = [timed_step(trainer) for _ in range(args.steps if i < saves else 1)]
            baseline.extend(before)
            window = args.steps if i < saves else 1
            record = measure_save(trainer, subject, min_window=window,
                                  max_window=max(window, args.max_window_steps))
            # and as many once the save is durable: the baseline brackets the save, so a step
            # time that drifts while a mode runs (seen on the H200 hosts: 0.095 -> 0.100 s) is
            # not counted as stall, nor as negative stall
            after = [timed_step(trainer) for _ in range(args.steps if i < saves else 0)]
            baseline.extend(after)
            record.update(measured=i < saves, checksums=checksums, baseline_s=before + after,
                          baseline_before_s=before, pair=i if len(variants) == 2 else None)
            if dist.get_rank() == 0 and record["durable_s"] is not None:
                record["disk_bytes"] = dir_bytes(subject.newest_step_dir())
            records.append(record)
            subject.keep_newest_only()


def summarize_mode(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """Stall, blocking, staging and commit figures of one mode over its measured saves."""
    # Each save against the steps just around it: a shared or thermally drifting machine moves
    # the step time between saves more than many a save does.
    stalls_by_rank = [[r["blocked_s"] + sum(r["window_s"]) - len(r["window_s"]) * median(r["baseline_s"])
                       for r in rank_result["saves"] if r["measured"] and r["checksums"]]
                      for rank_result in per_rank]
    stall_per_save = [max(column) for column in zip(*stalls_by_rank)]
    rank0 = per_rank[0]["saves"]
    measured = [i for i, r in enumerate(rank0) if r["measured"] and r["checksums"]]
    blocked = [max(p["saves"][i]["blocked_s"] for p in per_rank) for i in measured]
    stage = [max((p["saves"][i]["stage_s"] or 0.0) for p in per_rank) if rank0[i]["stage_s"] is not None else None
             for i in range(len(rank0))]
    unchecked = [i for i, r in enumerate(rank0) if r["measured"] and not r["checksums"]]
    hash_waits = [max(p["saves"][i].get("hash_wait_s") or 0.0 for p in per_rank)
                  for i in measured if rank0[i].get("hash_wait_s") is not None]
    windows = [len(rank0[i]["window_s"]) for i in measured]
    noises = [drift_noise(p["baseline_step_s"], windows) for p in per_rank]  # None: too few steps to tell
    return {
        "baseline_step_s": median([median(p["baseline_step_s"]) for p in per_rank]),
        "stall_s": median(stall_per_save), "stall_s_per_save": stall_per_save,
        # the first save of a pinned mode also allocates and pins its buffers (once per run)
        "stall_s_from_2nd": median(stall_per_save[1:]) if len(stall_per_save) > 1 else None,
        "stall_noise_s": None if None in noises else max(noises),
        "baseline_step_quartiles_s": step_quartiles(per_rank[0]["baseline_step_s"]),
        "blocked_s": median(blocked), "blocked_s_per_save": blocked,
        "state_dict_s": max((p.get("state_dict_s") or 0.0) for p in per_rank) if "state_dict_s" in per_rank[0]
        else None,
        "durable_s": median([rank0[i]["durable_s"] for i in measured]),
        "durable_s_per_save": [r["durable_s"] for r in rank0],
        "warmup_durable_s": [r["durable_s"] for r in per_rank[0].get("warmup_saves", [])],  # unmeasured
        "durable_s_without_checksums": median([rank0[i]["durable_s"] for i in unchecked]) if unchecked else None,
        "checksum_ratio_per_pair": checksum_pairs(rank0),
        # what the slowest rank's writer waited for checksums beyond its writes (sync saves)
        "hash_wait_s": median(hash_waits) if hash_waits else None,
        "stage_s_per_save": stage,
        "stage_s_from_2nd": median(stage[1:]) if len(stage) > 1 else None,
        "durable_within_window": all(rank0[i]["durable_in_window"] for i in measured),
        "window_steps": windows,
        "disk_bytes": rank0[measured[-1]].get("disk_bytes") if measured else None,
        "local_bytes_per_rank": [p["saves"][0]["local_bytes"] for p in per_rank],
        # rank 0's save phases, seconds after save() (cairn async modes; see AsyncSaver.timeline)
        "timeline": {key: median([rank0[i]["timeline"][key] for i in measured if key in rank0[i].get("timeline", {})])
                     for key in (rank0[measured[0]].get("timeline", {}) if measured else {})},
    }


def step_quartiles(steps: list[float]) -> list[float] | None:
    """The 25th, 50th and 75th percentiles of step times without a save in flight."""
    return statistics.quantiles(steps, n=4) if len(steps) >= 4 else None


def drift_noise(steps: list[float], windows: list[int]) -> float | None:
    """About how far step-time drift alone moves one save's stall estimate, in seconds.

    A window of L steps is compared with a baseline a few steps long; when the step time
    wanders between levels (a launch-bound step: 0.10-0.19 s seen with 1B at batch 1 on the
    H200 hosts), a window's steps sit anywhere within the baseline's spread, so
    the estimate moves by about L x half the interquartile range of the baseline steps. A
    GPU-bound step (a larger batch) shrinks it: 0.06 s against 0.8 s (RESULTS.md, session 7).
    """
    quartiles = step_quartiles(steps)
    if quartiles is None or not windows:
        return None
    return median(windows) * (quartiles[2] - quartiles[0]) / 2


def checksum_pairs(records: list[dict[str, Any]]) -> list[float]:
    """Durable time with checksums / without, for each back-to-back pair of measured saves."""
    out = []
    for a, b in zip(records, records[1:]):
        if a["measured"] and b["measured"] and a["step"] != b["step"] and a["checksums"] != b["checksums"] \
                and a.get("pair") is not None and a.get("pair") == b.get("pair"):
            on, off = (a, b) if a["checksums"] else (b, a)
            if on["durable_s"] and off["durable_s"]:
                out.append(on["durable_s"] / off["durable_s"])
    return out


def memory_summary(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """New buffer/pinned allocations per save, buffer bytes against the shard, RSS growth."""
    ranks = []
    for rank_result in per_rank:
        saves = [r for r in rank_result["saves"] if r["checksums"]]
        allocations = [r["memory_after"].get("buffer_allocations", 0) - r["memory_before"].get("buffer_allocations", 0)
                       for r in saves]
        host_allocs = [r["memory_after"]["host_allocator"].get("num_host_alloc", 0)
                       - r["memory_before"]["host_allocator"].get("num_host_alloc", 0) for r in saves]
        rss = [r["memory_after"]["rss_bytes"] for r in saves]
        retained = saves[-1]["memory_after"].get("buffers_retained_bytes", 0)
        pinned_reserved = saves[-1]["memory_after"]["host_allocator"].get("allocated_bytes.current")
        shard = saves[-1]["local_bytes"]
        ranks.append({
            "saves": len(saves), "new_buffer_allocations_per_save": allocations,
            "new_pinned_host_allocations_per_save": host_allocs if torch.cuda.is_available() else None,
            "buffers_pinned": saves[-1]["memory_after"].get("buffers_pinned"),
            "buffer_bytes": retained, "pinned_allocator_bytes": pinned_reserved, "shard_bytes": shard,
            "buffer_over_shard": ratio(max(retained, pinned_reserved or 0), shard),
            "rss_bytes_per_save": rss, "rss_before_first_save": saves[0]["memory_before"]["rss_bytes"],
            "rss_growth_after_first_save_pct": 100.0 * (rss[-1] - rss[0]) / rss[0] if len(rss) > 1 else None,
        })
    return {
        "per_rank": ranks,
        "new_allocations_after_2nd_save": max(sum(r["new_buffer_allocations_per_save"][2:]) for r in ranks),
        "new_pinned_host_allocations_after_2nd_save":
            max(sum(r["new_pinned_host_allocations_per_save"][2:]) for r in ranks) if torch.cuda.is_available()
            else None,
        "rss_growth_pct": max((r["rss_growth_after_first_save_pct"] or 0.0) for r in ranks),
        "saves": ranks[0]["saves"],
        "buffer_over_shard": max((r["buffer_over_shard"] or 0.0) for r in ranks),
    }


def measure_loads(trainer, subject, args) -> dict[str, Any]:
    """Cold loads of the subject's newest step into the live training state (same layout)."""
    step_dir = subject.newest_step_dir() if dist.get_rank() == 0 else None
    step_dir = gather(str(step_dir) if step_dir else None)[0]
    if step_dir is None:
        return {"error": "no committed step to load"}
    files = files_under(Path(step_dir))
    variants = (False, True) if subject.name == "cairn" else (False,)
    times: dict[bool, list[float]] = {v: [] for v in variants}
    phases: list[dict[str, Any]] = []
    hash_waits: list[float] = []
    method = None
    subject.load(verify=False)  # warm: lazy imports and first-call costs are not the disk's
    dist.barrier()
    for repeat in range(max(1, args.loads)):
        for verify in variants if repeat % 2 == 0 else variants[::-1]:  # no variant always goes first
            method = drop_page_cache(files, args.drop_caches)
            sync()
            start = time.perf_counter()
            subject.load(verify=verify)
            sync()
            elapsed = time.perf_counter() - start
            dist.barrier()
            times[verify].append(max(gather(elapsed)))
            if verify and hasattr(subject, "load_hash_wait_seconds"):
                hash_waits.append(max(gather(subject.load_hash_wait_seconds() or 0.0)))
            if dist.get_rank() == 0 and getattr(subject.checkpointer, "load_phases", None):
                phases.append({"verify": verify, **subject.checkpointer.load_phases})  # rank 0's, seconds
    out = {"step_dir": step_dir, "bytes": dir_bytes(Path(step_dir)), "cache_drop": method,
           "load_s": median(times[False]), "load_s_all": times[False], "phases": phases}
    if True in times:
        out.update(load_verify_s=median(times[True]), load_verify_s_all=times[True],
                   # repeat by repeat (the two loads of a repeat run back to back)
                   verify_ratio_per_pair=[a / b for a, b in zip(times[True], times[False])],
                   # per verifying load, how long the slowest rank's reads, once done, waited for its hashes
                   verify_hash_wait_s=hash_waits or None)
    return out


# --- torchtitan -------------------------------------------------------------------------------------

def torchtitan_status() -> tuple[bool, str]:
    try:
        import torchtitan
        from torchtitan.components.checkpoint import CheckpointManager  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure is a reason to skip, recorded
        return False, f"import torchtitan failed: {type(e).__name__}: {e}"
    return True, getattr(torchtitan, "__version__", "unknown")


def run_subject_mode(trainer, make_subject: Callable[[], Any], args, **kwargs) -> dict[str, Any]:
    """Build, measure and close one subject; an error is recorded (all ranks) instead of raised."""
    subject, result, error = None, {}, None
    try:
        subject = make_subject()
        run_mode(trainer, subject, args, result, **kwargs)
    except Exception as e:  # noqa: BLE001 - a peer's failure (e.g. torchtitan's) is a result to report
        error = f"{type(e).__name__}: {e}".strip()[:600]
    errors = [e for e in gather(error) if e]
    per_rank = gather(result)
    complete = all(any(r["measured"] for r in p.get("saves", [])) for p in per_rank)
    outcome = {"per_rank": per_rank if complete else None, "subject": subject}
    if errors:
        with contextlib.suppress(Exception):
            if subject is not None:
                subject.close()
        outcome.update(error=errors[0], subject=None)
    return outcome


# --- load-and-reshard in another layout, in separate processes -------------------------------------

def default_reshard(world: int, degrees: dict[str, int]) -> tuple[int, list[str]] | str:
    if world == 1:
        if torch.cuda.is_available():
            return "one GPU has no other layout: on a multi-GPU host it loads into another dp/tp split"
        return 2, ["--parallelism.data_parallel_shard_degree", "2"]
    if degrees["tp"] == 1 and world % 2 == 0:
        return world, ["--parallelism.data_parallel_shard_degree", str(world // 2),
                       "--parallelism.tensor_parallel_degree", "2"]
    return world, ["--parallelism.data_parallel_shard_degree", str(world)]


def run_reshard_child(args, base_argv: list[str], step_dir: str, nproc: int, layout: list[str],
                      global_batch: int) -> dict[str, Any]:
    """Load ``step_dir`` in ``layout`` with ``nproc`` fresh processes (a torchrun of their own)."""
    out = Path(tempfile.mkdtemp(prefix="cairn_bench_")) / "reshard.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(Path(__file__).resolve()), "--child-load", step_dir, "--child-out", str(out),
               "--child-global-batch", str(global_batch), "--drop-caches", args.drop_caches,
               "--flavor", args.flavor, *base_argv, *layout]
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_ENV}
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0 or not out.exists():
        lines = (proc.stdout + proc.stderr).splitlines()
        rank0 = [line for line in lines if line.startswith("[rank0]:")] or lines
        return {"error": f"reshard run failed ({proc.returncode}):\n" + "\n".join(rank0[-30:]), "command": command}
    result = json.loads(out.read_text())
    shutil.rmtree(out.parent, ignore_errors=True)
    result.update(nproc=nproc, layout_flags=layout, process_wall_s=wall)
    return result


def same_global_batch(config, global_batch: int) -> None:
    """Keep the saved run's global batch (the dataloader state resumes only with it): the largest
    local batch up to the configured one that divides it, the rest by gradient accumulation."""
    from cairn.distributed.parallel_dims import ParallelDims

    dp = ParallelDims.from_config(config.parallelism, int(os.environ.get("WORLD_SIZE", 1))).dp_degree
    if global_batch <= 0 or global_batch % dp:
        config.checkpoint.exclude_from_loading.append("dataloader")  # cannot resume that stream on this dp
        return
    per_rank = global_batch // dp
    local = max(b for b in range(1, min(per_rank, config.training.local_batch_size) + 1) if per_rank % b == 0)
    config.training.global_batch_size, config.training.local_batch_size = global_batch, local


def child_load(args, cairn_argv: list[str]) -> None:
    """The reshard child: build the Trainer in its layout, load the step cold, report."""
    from cairn.config.manager import parse_args
    from cairn.trainer import Trainer

    step_dir = Path(args.child_load)
    step = int(step_dir.name.split("-")[1])
    flags = cairn_flags(args, cairn_argv, step_dir.parent.parent)
    flags += ["--checkpoint.enable", "--checkpoint.folder", str(step_dir.parent), "--checkpoint.load_step",
              str(step), "--checkpoint.async_mode", "disabled"]
    config = parse_args(flags)
    same_global_batch(config, args.child_global_batch)
    trainer = Trainer(config)
    import cairn.checkpoint.reader  # noqa: F401 - imported lazily by the load; its .pyc is not the checkpoint
    method = drop_page_cache(files_under(step_dir), args.drop_caches)
    sync()
    start = time.perf_counter()
    trainer.checkpointer.load()
    sync()
    elapsed = max(gather(time.perf_counter() - start))
    try:
        after = {"loss_after_load": trainer.train_step()["loss"]}  # the loaded state trains
    except Exception as e:  # noqa: BLE001 - e.g. out of memory on fewer GPUs: the load itself was timed
        after = {"train_step_after_load_error": f"{type(e).__name__}: {e}"[:300]}
    if dist.get_rank() == 0:
        Path(args.child_out).write_text(json.dumps({
            "load_s": elapsed, "bytes": dir_bytes(step_dir), "cache_drop": method,
            "layout": trainer.parallel_dims.degrees, "global_batch_size": trainer.dataloader.global_batch_size,
            "excluded_from_loading": config.checkpoint.exclude_from_loading, **after}))
    trainer.checkpointer.close()
    trainer.close()


# --- the report --------------------------------------------------------------------------------------

TARGETS = {
    "stall_over_sync_save": ("<=", 0.05, "stall(async_with_pinned_mem) / sync save time"),
    "staging_efficiency": (">=", 0.7, "bytes staged / staging time / copy ceiling (2nd save on)"),
    "persist_efficiency": (">=", 0.8, "bytes / time to durable commit / fsync'd write ceiling"),
    "load_efficiency": (">=", 0.8, "bytes / cold load time / cold read ceiling"),
    "new_pinned_allocations_after_2nd_save": ("<=", 0, "new staging buffers allocated after the 2nd save"),
    "rss_growth_pct": ("<", 5.0, "host RSS growth from the 1st to the last of --rss-saves saves, %"),
    "pinned_over_shard": ("<=", 2.0, "staging buffer bytes / the rank's checkpoint shard bytes"),
    "save_checksum_overhead": ("<=", 1.05, "sync save time with xxh3 checksums / without (median of back-to-back pairs)"),
    "load_checksum_overhead": ("<=", 1.05, "cold load time with verify / without"),
    "stall_vs_torchtitan": ("<=", 1.0, "cairn stall / torchtitan stall (best mode of each)"),
    "durable_vs_torchtitan": ("<=", 1.0, "cairn time to durable commit / torchtitan's (best mode of each)"),
}


def physical(stall: float | None) -> float | None:
    """A negative median stall is step-time noise larger than the save's cost: count it as 0."""
    return None if stall is None else max(stall, 0.0)


def compute_ratios(report: dict[str, Any]) -> dict[str, Any]:
    cairn, ceilings = report["cairn"], report["ceilings"]
    pinned = cairn.get(PINNED, {})
    variants = {mode: result for mode, result in cairn.items() if mode.startswith(PINNED + "+")
                and isinstance(result, dict)}
    sync_save = cairn.get("disabled", {}).get("blocked_s")
    copy_gbps = ceilings["copy"]["together_gbps_per_rank_min"]
    write_gbps = ceilings["disk"]["all_ranks"]["write_fsync_gbps"]
    read_gbps = ceilings["disk"]["all_ranks"]["cold_read_gbps"]
    values: dict[str, float | None] = {}
    values["stall_over_sync_save"] = ratio(physical(pinned.get("stall_s")), sync_save)
    stage = pinned.get("stage_s_from_2nd")
    if stage:  # the slowest rank's staging against the per-rank copy ceiling with all ranks copying
        local = max(pinned["local_bytes_per_rank"])
        values["staging_efficiency"] = local / stage / 1e9 / copy_gbps
    if pinned.get("disk_bytes") and pinned.get("durable_s"):
        values["persist_efficiency"] = pinned["disk_bytes"] / pinned["durable_s"] / 1e9 / write_gbps
    load = cairn.get("load", {})
    if load.get("load_s"):
        values["load_efficiency"] = load["bytes"] / load["load_s"] / 1e9 / read_gbps
    memory = cairn.get("memory") or {}
    values["new_pinned_allocations_after_2nd_save"] = memory.get("new_allocations_after_2nd_save")
    values["rss_growth_pct"] = memory.get("rss_growth_pct")
    values["pinned_over_shard"] = memory.get("buffer_over_shard")
    disabled = cairn.get("disabled", {})
    pairs = disabled.get("checksum_ratio_per_pair")
    values["save_checksum_overhead"] = median(pairs) if pairs else ratio(disabled.get("durable_s"),
                                                                         disabled.get("durable_s_without_checksums"))
    values["load_checksum_overhead"] = ratio(load.get("load_verify_s"), load.get("load_s"))
    titan = report.get("torchtitan", {})
    if titan.get("available"):
        def best(results: dict, key: str) -> float | None:
            found = [r[key] for m, r in results.items() if m.split("+")[0] in MODES and m != "disabled"
                     and isinstance(r, dict) and r.get(key) is not None]
            return min(found) if found else None

        values["stall_vs_torchtitan"] = ratio(physical(best(cairn, "stall_s")), physical(best(titan, "stall_s")))
        values["durable_vs_torchtitan"] = ratio(best(cairn, "durable_s"), best(titan, "durable_s"))
    out = {}
    for name, (op, target, meaning) in TARGETS.items():
        value = values.get(name)
        passed = None if value is None else {"<=": value <= target, ">=": value >= target, "<": value < target}[op]
        out[name] = {"value": value, "target": f"{op} {target}", "pass": passed, "meaning": meaning}
    for mode, result in variants.items():  # the stall target, for each variant of the pinned mode
        value = ratio(physical(result.get("stall_s")), sync_save)
        op, target, meaning = TARGETS["stall_over_sync_save"]
        out[f"stall_over_sync_save[{mode.split('+', 1)[1]}]"] = {
            "value": value, "target": f"{op} {target}", "pass": None if value is None else value <= target,
            "meaning": meaning.replace(PINNED, mode)}
    return out


def _fmt(value: Any, unit: str = "", digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def format_table(report: dict[str, Any]) -> str:
    lines = []
    host = report["host"]
    saved = [m.get("disk_bytes") for m in report["cairn"].values() if isinstance(m, dict) and m.get("disk_bytes")]
    checkpoint_bytes = report["model"].get("checkpoint_bytes") or max(saved, default=0)  # loads skipped: the saves'
    lines.append(f"cairn checkpoint benchmark: {report['config']['flavor']} on {host['device']} x "
                 f"{host['world_size']} ({report['config']['layout']}), checkpoint "
                 f"{_fmt(checkpoint_bytes / 1e9, ' GB')}")
    c = report["ceilings"]
    lines.append("ceilings:")
    lines.append(f"  {c['copy']['kind']}: {_fmt(c['copy']['alone_gbps_min'], ' GB/s', 2)} per rank alone, "
                 f"{_fmt(c['copy']['together_gbps_per_rank_min'], ' GB/s', 2)} per rank all at once "
                 f"({_fmt(c['copy']['together_gbps_total'], ' GB/s', 2)} total); fresh pageable "
                 f"{_fmt(c['copy']['fresh_pageable_gbps_min'], ' GB/s', 2)}")
    for label, key in (("rank 0 alone", "rank0_alone"), ("all ranks", "all_ranks")):
        d = c["disk"][key]
        lines.append(f"  disk, {label}: write+fsync {_fmt(d['write_fsync_gbps'], ' GB/s', 2)} (plain "
                     f"{_fmt(d.get('write_fsync_plain_gbps'), ' GB/s', 2)}, writeback as written "
                     f"{_fmt(d.get('write_fsync_streamed_gbps'), ' GB/s', 2)}; buffered "
                     f"{_fmt(d['write_buffered_gbps'], ' GB/s', 2)}), cold read {_fmt(d['cold_read_gbps'], ' GB/s', 2)}"
                     f" [{d['cache_drop']}]")
    header = f"  {'who':<11}{'mode':<32}{'step':>9}{'blocked':>10}{'stall':>10}{'staging':>10}{'durable':>10}"
    lines += ["saves (median over saves; seconds):", header]
    for who in ("cairn", "torchtitan"):
        results = report.get(who, {})
        for mode, r in results.items():
            if mode.split("+")[0] not in MODES or not isinstance(r, dict):
                continue
            if "error" in r:
                lines.append(f"  {who:<11}{mode:<32}  error: {r['error'][:90]}")
                continue
            lines.append(f"  {who:<11}{mode:<32}{_fmt(r['baseline_step_s'], '', 4):>9}{_fmt(r['blocked_s']):>10}"
                         f"{_fmt(r['stall_s']):>10}{_fmt(r['stage_s_from_2nd']):>10}{_fmt(r['durable_s']):>10}")
    sync = report.get("cairn", {}).get("disabled")
    for mode, r in report.get("cairn", {}).items():
        if mode == "disabled" or mode.split("+")[0] not in MODES or not isinstance(r, dict) \
                or r.get("stall_noise_s") is None:
            continue
        quartiles = r.get("baseline_step_quartiles_s") or [None] * 3
        lines.append(f"  cairn      {mode} stall per save: " + ", ".join(_fmt(x) for x in r["stall_s_per_save"])
                     + f"; step-time drift alone moves one by about +-{_fmt(r['stall_noise_s'], ' s')}"
                     + f" (steps {_fmt(quartiles[0], '', 4)}-{_fmt(quartiles[2], '', 4)} s, 25th-75th percentile)")
        allowed = TARGETS["stall_over_sync_save"][1] * (sync.get("blocked_s") or 0.0) if isinstance(sync, dict) else 0.0
        if allowed and r["stall_noise_s"] > allowed / 2:
            lines.append(f"  {'':<11}that drift is more than half the stall target allows ({_fmt(allowed, ' s')}): "
                         "steps that keep the GPU busy (a larger --training.local_batch_size) are steadier")
    if isinstance(sync, dict) and sync.get("checksum_ratio_per_pair"):
        lines.append(f"  cairn      sync save with checksums / without, per pair: "
                     + ", ".join(_fmt(x) for x in sync["checksum_ratio_per_pair"])
                     + f"; waited on the hash beyond the writes: {_fmt(sync.get('hash_wait_s'), ' s')}")
    titan = report.get("torchtitan", {})
    if not titan.get("available"):
        lines.append(f"  torchtitan skipped: {titan.get('reason')}")
    lines.append("loads (cold):")
    for who in ("cairn", "torchtitan"):
        load = report.get(who, {}).get("load")
        if isinstance(load, dict) and "load_s" in load:
            extra = f", with verify {_fmt(load.get('load_verify_s'), ' s')}" if "load_verify_s" in load else ""
            if load.get("verify_ratio_per_pair"):
                extra += " (per pair " + ", ".join(_fmt(x) for x in load["verify_ratio_per_pair"]) + ")"
            if load.get("verify_hash_wait_s"):
                extra += f"; the hashes ended {_fmt(median(load['verify_hash_wait_s']), ' s')} after the reads"
            lines.append(f"  {who:<11}same layout {_fmt(load['load_s'], ' s')}{extra} "
                         f"({_fmt(load['bytes'] / load['load_s'] / 1e9, ' GB/s', 2)})")
            plain = [p for p in load.get("phases", []) if not p["verify"]]
            if plain:
                lines.append(f"  {'':<11}parts of the last: " + ", ".join(
                    f"{k} {_fmt(v, ' s')}" for k, v in plain[-1].items() if k != "verify"))
    reshard = report["cairn"].get("reshard")
    if isinstance(reshard, dict):
        if "load_s" in reshard:
            lines.append(f"  cairn      reshard into {reshard['layout']} on {reshard['nproc']} process(es): "
                         f"{_fmt(reshard['load_s'], ' s')}")
        else:
            lines.append(f"  cairn      reshard: {str(reshard.get('error') or reshard.get('skipped'))[:200]}")
    lines.append("ratios:")
    for name, r in report["ratios"].items():
        verdict = {True: "ok", False: "MISS", None: "n/a"}[r["pass"]]
        lines.append(f"  {name:<40}{_fmt(r['value']):>10}  target {r['target']:<8} {verdict:<5} {r['meaning']}")
    return "\n".join(lines)


def host_info(world: int) -> dict[str, Any]:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    return {"hostname": socket.gethostname(), "device": device, "world_size": world,
            "gpus_visible": torch.cuda.device_count() if torch.cuda.is_available() else 0,
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "omp_num_threads": torch.get_num_threads(),
            "load_average_at_start": os.getloadavg(),  # a busy shared machine makes every figure noisy
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def write_json(path: str, report: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)


# --- main -----------------------------------------------------------------------------------------

def local_state_bytes(trainer) -> int:
    from cairn.checkpoint import ModelState, state_bytes

    state = dict(ModelState(trainer.model_parts).state_dict())
    state["optimizer"] = trainer.optimizers.state_dict()
    return state_bytes(state)


def measure_cairn(trainer, args, folder: Path, report: dict[str, Any]) -> Any:
    """Every requested cairn mode; returns the subject whose newest step the loads use."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    # The host memory series runs in the first pinned mode listed (variants included).
    series = next((m for m in modes if m.split("+")[0] == PINNED), None)
    last = None
    for mode in modes:
        if last is not None and args.keep_steps == 0:  # the disk holds one checkpoint of this flavor
            retire(last)
            last = None
        extra = max(0, args.rss_saves - args.saves) if mode == series else 0
        outcome = run_subject_mode(trainer, lambda: CairnSubject(trainer, mode, folder / f"cairn-{mode}"), args,
                                   saves=args.saves, extra_saves=extra, checksum_toggle=mode == "disabled")
        report["cairn"][mode] = mode_report(outcome)
        if outcome["per_rank"] is not None and mode == series:
            report["cairn"]["memory"] = memory_summary(outcome["per_rank"])
            report["cairn"]["memory"]["mode"] = mode
        if outcome["subject"] is not None:
            if last is not None:
                retire(last)
            last = outcome["subject"]
    return last


def retire(subject) -> None:
    """Close a subject and delete its checkpoints: a big flavor's steps must not pile up on the disk."""
    subject.close()
    if dist.get_rank() == 0:
        shutil.rmtree(subject.folder, ignore_errors=True)
    release_host_cache()
    dist.barrier()


def release_host_cache() -> None:
    """Return the caching host allocator's free pinned blocks to the system.

    A synchronous DCP save copies every tensor to pinned memory from that allocator (8B on 2 GPUs:
    53 GB per rank), which keeps the blocks for reuse. The next mode measured in the same process
    must not run beside them: a run that uses that mode never had them.
    """
    if not torch.cuda.is_available():
        return
    gc.collect()
    for name in ("_host_emptyCache", "_accelerator_emptyHostCache"):  # torch 2.11 / later names
        release = getattr(torch._C, name, None)
        if release is not None:
            release()
            return


def mode_report(outcome: dict[str, Any]) -> dict[str, Any]:
    """The summary of one mode's saves (those before a failure, if one failed) and its error."""
    out = summarize_mode(outcome["per_rank"]) if outcome["per_rank"] is not None else {}
    if "error" in outcome:
        out["error"] = outcome["error"]
    if outcome["per_rank"] is not None and dist.get_rank() == 0:
        out["raw"] = outcome["per_rank"]
    return out


def measure_torchtitan(trainer, args, folder: Path, report: dict[str, Any]) -> None:
    available, detail = torchtitan_status() if args.torchtitan == "auto" else (False, "--torchtitan off")
    # Every rank must agree, or the ranks would run different collectives.
    available = all_true(available)
    report["torchtitan"] = {"available": available, "version" if available else "reason": detail}
    if not available:
        return
    for mode in [m.strip() for m in args.torchtitan_modes.split(",") if m.strip()]:
        outcome = run_subject_mode(trainer, lambda: TorchtitanSubject(trainer, mode, folder / f"torchtitan-{mode}"),
                                   args, saves=args.saves)
        report["torchtitan"][mode] = mode_report(outcome)
        subject = outcome["subject"]
        if subject is None:
            continue
        if mode == "disabled" and args.loads > 0:  # its own load of its own checkpoint
            trainer.checkpointer = subject.checkpointer
            try:
                report["torchtitan"]["load"] = measure_loads(trainer, subject, args)
            except Exception as e:  # noqa: BLE001 - recorded, like a failing save
                report["torchtitan"]["load"] = {"error": f"{type(e).__name__}: {e}"[:600]}
        retire(subject)


def main(argv: list[str]) -> None:
    args, cairn_argv = parse_bench_args(argv)
    if args.child_load:
        child_load(args, cairn_argv)
        return
    from cairn.config.manager import parse_args
    from cairn.checkpoint.fsio import writeback_bytes
    from cairn.trainer import GarbageCollection, Trainer

    global COLLECTOR
    folder = Path(args.folder).resolve()
    trainer = Trainer(parse_args(cairn_flags(args, cairn_argv, folder / "dump")))
    COLLECTOR = GarbageCollection(trainer.job_config.training.gc_freq).__enter__()  # as Trainer.train does
    rank, world = trainer.rank, trainer.world_size
    if rank == 0 and folder.exists() and not args.keep:
        for path in folder.glob("*"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink()
    dist.barrier()
    for _ in range(args.warmup):
        timed_step(trainer)
    shard = local_state_bytes(trainer)
    ceiling = args.ceiling_mb << 20 if args.ceiling_mb else min(max(max(gather(shard)), 256 << 20), 2048 << 20)
    report: dict[str, Any] = {
        "host": host_info(world),
        "config": {"flavor": args.flavor, "layout": trainer.parallel_dims.degrees, "steps": args.steps,
                   "saves": args.saves, "rss_saves": args.rss_saves, "folder": str(folder),
                   "argv": argv, "cairn_flags": cairn_flags(args, cairn_argv, folder / "dump"),
                   "seq_len": trainer.job_config.training.seq_len,
                   "local_batch_size": trainer.job_config.training.local_batch_size,
                   "writeback_bytes": writeback_bytes()},
        "model": {"params": trainer.model_args.num_params(), "shard_bytes_per_rank": gather(shard)},
        "cairn": {},
    }
    report["ceilings"] = {"copy": copy_ceilings(min(ceiling, 1024 << 20)),
                          "disk": disk_ceilings(folder / "ceiling", ceiling, args.drop_caches)}

    def checkpoint() -> None:  # partial results survive a later failure or time-out
        if rank == 0:
            report["ratios"] = compute_ratios(report)
            write_json(args.out, report)

    checkpoint()
    loaded_from = measure_cairn(trainer, args, folder, report)
    if loaded_from is not None and args.loads == 0:
        retire(loaded_from)
        loaded_from = None
    if loaded_from is not None:
        trainer.checkpointer = loaded_from.checkpointer
        try:
            report["cairn"]["load"] = measure_loads(trainer, loaded_from, args)
            report["model"]["checkpoint_bytes"] = report["cairn"]["load"]["bytes"]
        except Exception as e:  # noqa: BLE001 - the saves' figures are still worth writing
            report["cairn"]["load"] = {"error": f"{type(e).__name__}: {e}"[:600]}
        loaded_from.close()  # its newest step stays on disk for the reshard run
        del loaded_from
    checkpoint()
    measure_torchtitan(trainer, args, folder, report)
    checkpoint()

    step_dir = report["cairn"].get("load", {}).get("step_dir")
    reshard = None
    if args.reshard_args is not None:
        reshard = (args.reshard_nproc or world, args.reshard_args.split())
    elif step_dir:
        reshard = default_reshard(world, trainer.parallel_dims.degrees)
        if args.reshard_nproc and not isinstance(reshard, str):
            reshard = (args.reshard_nproc, reshard[1])
    global_batch = trainer.dataloader.global_batch_size
    # Free the devices for the reshard run's processes (the checkpointers held the model too).
    trainer.checkpointer = None
    del trainer
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    dist.barrier()
    dist.destroy_process_group()
    if rank != 0:
        return
    if args.loads == 0:
        report["cairn"]["reshard"] = {"skipped": "--loads 0"}
    elif step_dir is None:
        report["cairn"]["reshard"] = {"skipped": "no cairn checkpoint was written"}
    elif isinstance(reshard, str):
        report["cairn"]["reshard"] = {"skipped": reshard}
    else:
        nproc, layout = reshard
        report["cairn"]["reshard"] = run_reshard_child(args, without_parallelism(cairn_argv), step_dir, nproc, layout,
                                                       global_batch)
    report["ratios"] = compute_ratios(report)
    report["host"]["load_average_at_end"] = os.getloadavg()
    write_json(args.out, report)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    print(format_table(report), flush=True)
    print(f"results: {Path(args.out).resolve()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
