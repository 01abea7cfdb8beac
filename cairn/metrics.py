"""Training metrics: console, ``<dump_folder>/metrics.jsonl`` and TensorBoard (rank 0 only)."""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

import torch

from cairn.config.job_config import MetricsSection

logger = logging.getLogger("cairn")


def memory_gib(device: torch.device) -> float:
    """Peak device memory (CUDA) or resident host memory (CPU) of this process, in GiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import psutil

    return psutil.Process(os.getpid()).memory_info().rss / 2**30


class _BackgroundTensorBoard:
    """A TensorBoard writer made and fed on a thread of its own: importing TensorBoard takes a
    second or more, which no run's start (a restart least of all) should wait for."""

    def __init__(self, log_dir: Path):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(log_dir,), name="cairn-tensorboard", daemon=True)
        self._thread.start()

    def _run(self, log_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(log_dir))
        except Exception as e:  # noqa: BLE001 - metrics.jsonl still has everything
            logger.warning("TensorBoard logs are off: %s: %s", type(e).__name__, e)
            writer = None
        while (item := self._queue.get()) is not None:
            if writer is not None:
                scalars, step = item
                for key, value in scalars.items():
                    writer.add_scalar(key, value, step)
        if writer is not None:
            writer.close()

    def add_scalars(self, scalars: dict[str, float], step: int) -> None:
        self._queue.put((scalars, step))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


class MetricsLogger:
    def __init__(self, config: MetricsSection, dump_folder: str | Path, *, rank: int, append: bool):
        self.config = config
        self.rank = rank
        self.jsonl = None
        self.tb = None
        if rank != 0:
            return
        folder = Path(dump_folder)
        folder.mkdir(parents=True, exist_ok=True)
        if config.enable_jsonl:
            # A resumed run appends; a fresh run starts the file anew.
            self.jsonl = open(folder / "metrics.jsonl", "a" if append else "w", buffering=1)
        if config.enable_tensorboard:
            self.tb = _BackgroundTensorBoard(folder / "tb")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.rank != 0:
            return
        record = {"step": step, **metrics, "time": time.time()}
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            self.tb.add_scalars({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step)
        if step % self.config.log_freq == 0 or metrics.get("last"):
            logger.info("step %5d  loss %8.4f  grad_norm %7.4f  lr %.2e  tok/s %9.0f  step %6.1f ms  mem %5.2f GiB",
                        step, metrics["loss"], metrics.get("grad_norm", 0.0), metrics.get("lr", 0.0),
                        metrics.get("tokens_per_second", 0.0), metrics.get("step_time_ms", 0.0),
                        metrics.get("memory_gib", 0.0))

    def event(self, step: int, event: str, **fields) -> None:
        """A non-step record (a checkpoint save or load) in metrics.jsonl."""
        if self.rank == 0 and self.jsonl is not None:
            self.jsonl.write(json.dumps({"event": event, "step": step, **fields, "time": time.time()}) + "\n")

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
