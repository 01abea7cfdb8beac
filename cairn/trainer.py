"""The training loop, top to bottom: build, (re)load, step, checkpoint, log.

Build order matters: the model is created on the meta device, split into pipeline stages
and/or parallelized, materialized on the target device and initialized per FQN, so no
rank ever holds the whole model of a large flavor. Only then does the checkpointer load
(which overwrites the fresh weights if a checkpoint exists).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import os
import random
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.stateful import Stateful

from cairn.checkpoint import CheckpointManager, RNGState
from cairn.config.job_config import JobConfig, as_flags
from cairn.config.manager import ConfigError, to_dict
from cairn.data.dataloader import build_dataloader
from cairn.data.tokenizer import Tokenizer
from cairn.distributed.context_parallel import build_context_parallel
from cairn.distributed.parallel_dims import ParallelDims
from cairn.distributed.utils import dist_max, init_distributed
from cairn.metrics import MetricsLogger, memory_gib
from cairn.models import get_model_spec
from cairn.optim import build_lr_schedulers, build_optimizers, clip_grad_norm_

logger = logging.getLogger("cairn")


@dataclasses.dataclass
class TrainState(Stateful):
    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.step = int(state_dict["step"])
        self.tokens_seen = int(state_dict["tokens_seen"])

    @staticmethod
    def steps_done(state_dict: dict) -> int:
        """The step ``state_dict`` (one of these states') is at: a memory snapshot claiming another is refused."""
        step = state_dict["step"]
        if type(step) is not int:  # noqa: E721
            raise ValueError(f"step {step!r} is not an integer")
        return step


def resume_config(job_config: JobConfig) -> dict:
    """The part of the run config a resume depends on (what the state means and which data comes
    next, from which seed): a memory snapshot of a run that differs in it is refused. Not the
    number of steps, the learning rate, or the checkpoint and logging settings: a restart may
    change those."""
    config = to_dict(job_config)
    training = config["training"]
    return {"model": {key: config["model"][key] for key in ("name", "flavor", "tokenizer_path")},
            "data": config["dataloader"], "seed": config["debug"]["seed"],
            "batch": {key: training[key] for key in ("local_batch_size", "global_batch_size", "seq_len")},
            "optimizer": config["optimizer"]["name"]}


class GarbageCollection:
    """Python's cyclic garbage collector on the training loop's schedule (``--training.gc_freq``).

    Left automatic, a full collection runs whenever enough objects survive the younger ones,
    in whichever thread allocates, and walks every tracked object of the process (a few
    hundred thousand in a trainer: 0.05-0.1 s with the GIL held). An async save's planning
    allocates enough to trigger one mid-save, on the training thread's time. Instead, while
    the loop runs, automatic collection is off and a generation-1 collection (young objects
    only, milliseconds) runs every ``freq`` steps, as torchtitan's ``gc_freq`` does.
    """

    def __init__(self, freq: int):
        self.freq = freq
        self._was_enabled = gc.isenabled()

    def __enter__(self) -> GarbageCollection:
        if self.freq > 0:
            self._was_enabled = gc.isenabled()
            gc.disable()
            gc.collect(1)
        return self

    def run(self, step: int) -> None:
        """Before ``step``: collect if it is due."""
        if self.freq > 0 and step > 1 and step % self.freq == 0:
            gc.collect(1)

    def __exit__(self, *exc) -> None:
        if self.freq > 0 and self._was_enabled:
            gc.enable()


def cross_entropy_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def setup_logging(rank: int, level: str) -> None:
    """Log lines on stderr, rank 0's from ``level``, the others' warnings only, each naming its rank
    once; the checkpoint library's ``Config.<field>`` read as the flags that set them."""
    prefix = "" if _torchrun_captures_stderr() else f"[rank{rank}] "
    logging.basicConfig(level=getattr(logging, level.upper()) if rank == 0 else logging.WARNING,
                        format=f"{prefix}%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_in_flag_words)


def _in_flag_words(record: logging.LogRecord) -> bool:
    message = record.getMessage()
    translated = as_flags(message)
    if translated != message:
        record.msg, record.args = translated, None
    return True


def _torchrun_captures_stderr() -> bool:
    """Whether torchrun writes this worker's stderr to a log file of the rank's own, which names the rank.

    Under ``--tee`` or ``--redirects`` torchrun starts the worker with stderr open on
    ``<attempt log dir>/<local rank>/stderr.log``, beside the ``TORCHELASTIC_ERROR_FILE`` it
    exports. A tee'd file is copied to the console with every line prefixed
    ``[<role><local rank>]:`` (or per ``TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE``); a redirected
    one, or one ``--local-ranks-filter`` leaves out, stays on disk in the rank's folder.
    Otherwise stderr is the console's (or the caller's), unprefixed.
    """
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return False
    log_file = os.path.join(os.path.dirname(error_file), "stderr.log")
    try:
        return os.path.samestat(os.fstat(sys.stderr.fileno()), os.stat(log_file))
    except (OSError, ValueError):  # no such file, or a stderr without a descriptor
        return False


class StartupClock:
    """Where a start's time goes, from the process's birth to its first step: one record per
    start (``startup`` in metrics.jsonl), restarts included. Seconds of each phase, in order:
    ``interpreter`` (the process's birth to cairn.train's first line), ``imports``,
    ``distributed`` (the process group, and CUDA's context on GPU hosts), ``data``, ``model``
    (built, sharded, materialized; not initialized: a resume overwrites it), ``optimizer``,
    ``checkpointer`` (its lease, groups and folder checks), ``resume`` (the load, or the
    initialization of a fresh model), ``first_step`` (its step and its save call)."""

    def __init__(self, process_start: float | None = None, entered: float | None = None):
        self.process_start = process_start if process_start is not None else _process_start()
        self.phases: dict[str, float] = {}
        self._mark = time.time()
        if entered is not None and self.process_start is not None:
            self.phases["interpreter"] = max(0.0, entered - self.process_start)
            self.phases["imports"] = self._mark - entered

    def lap(self, name: str) -> None:
        now = time.time()
        self.phases[name] = self.phases.get(name, 0.0) + now - self._mark
        self._mark = now

    def record(self) -> dict:
        now = time.time()
        out = {"phases_s": {name: round(value, 4) for name, value in self.phases.items()},
               "restart_count": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)}
        if self.process_start is not None:
            out["process_to_first_step_s"] = round(now - self.process_start, 4)
        launched = os.environ.get("CAIRN_LAUNCH_UNIX")
        if launched and out["restart_count"] == 0:
            try:
                out["launch_to_first_step_s"] = round(now - float(launched), 4)
            except ValueError:
                pass
        return out


def _process_start() -> float | None:
    """When this process was born, in wall-clock seconds, to the kernel's 10 ms: its start in
    clock ticks since boot against the uptime now (the boot time the kernel reports is only
    whole seconds, which is what psutil's ``create_time`` adds)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):  # not Linux: a figure for the log, never a reason to fail
        return None


class Trainer:
    def __init__(self, job_config: JobConfig, clock: StartupClock | None = None):
        self.job_config = job_config
        self.clock = clock or StartupClock()
        self.device, self.rank, self.world_size = init_distributed()
        self.clock.lap("distributed")
        if job_config.checkpoint.create_seed_checkpoint:
            # A seed is initialized on one CPU process, whatever the host has: a job on any
            # number of GPUs then reshards it from step-0.
            self.device = torch.device("cpu")
        setup_logging(self.rank, job_config.debug.log_level)
        self._set_determinism(job_config.debug)

        self.parallel_dims = ParallelDims.from_config(job_config.parallelism, self.world_size)
        self.mesh = self.parallel_dims.build_mesh(self.device.type)
        # The cp ranks of one dp rank read the same sequences; each keeps its own tokens of them.
        dp_mesh = self.parallel_dims.dp_mesh
        self.dp_rank, self.dp_degree = dp_mesh.get_local_rank(), dp_mesh.size()

        try:
            self.tokenizer = Tokenizer(job_config.model.tokenizer_path)
        except (FileNotFoundError, ValueError) as e:  # the tokenizer's messages name the flag
            raise ConfigError([str(e)]) from e
        self.model_spec = get_model_spec(job_config.model.name)
        self.model_args = self._model_args()
        training = job_config.training
        try:
            self.dataloader = build_dataloader(
                job_config.dataloader, self.tokenizer, seq_len=training.seq_len,
                local_batch_size=training.local_batch_size, global_batch_size=training.global_batch_size,
                dp_rank=self.dp_rank, dp_degree=self.dp_degree, seed=job_config.debug.seed)
        except (ValueError, FileNotFoundError) as e:  # the loader's messages name the flags
            raise ConfigError([str(e)]) from e
        self.grad_accum_steps = self.dataloader.grad_accum_steps
        self.clock.lap("data")

        self._build_model()  # reports context parallelism's problems with the model's
        self.context_parallel = build_context_parallel(self.parallel_dims, job_config, self.device.type)
        self.clock.lap("model")
        self.optimizers = build_optimizers(self.model_parts, job_config.optimizer)
        self.lr_schedulers = build_lr_schedulers(self.optimizers, job_config.lr_scheduler, training.steps)
        self.train_state = TrainState()
        self.rng = RNGState(self.rank, self.world_size, self.device)
        self.clock.lap("optimizer")

        self.checkpointer = CheckpointManager(
            job_config.checkpoint, model_parts=self.model_parts,
            states={"optimizer": self.optimizers, "lr_scheduler": self.lr_schedulers, "dataloader": self.dataloader,
                    "train_state": self.train_state, "rng": self.rng},
            base_folder=job_config.job.dump_folder,
            sd_adapter=self.model_spec.state_dict_adapter(self.model_args),
            model_info={"name": self.model_spec.name, "flavor": job_config.model.flavor},
            run_info={"config": to_dict(job_config), "resume_config": resume_config(job_config)},
            total_steps=training.steps, seed=job_config.debug.seed, layout=self.parallel_dims.degrees,
            tokenizer_dir=self.tokenizer.path.parent, hf_assets_path=job_config.model.hf_assets_path)
        if not self.checkpointer.resume_expected():  # nothing will overwrite them: the fresh weights now
            self._init_if_fresh(False)
        self.clock.lap("checkpointer")
        self.metrics = None

    # --- building -------------------------------------------------------------------

    def _model_args(self):
        flavors = self.model_spec.flavors
        flavor = self.job_config.model.flavor
        if flavor not in flavors:
            raise ConfigError([f"--model.flavor {flavor!r}: not a flavor of {self.model_spec.name}; "
                               f"choose from {', '.join(flavors)}"])
        args = copy.deepcopy(flavors[flavor])
        args.max_seq_len = self.job_config.training.seq_len
        if flavor == "debugmodel" or args.vocab_size < self.tokenizer.vocab_size:
            args.vocab_size = self.tokenizer.vocab_size
        return args

    def _build_model(self) -> None:
        with torch.device("meta"):
            model = self.model_spec.model_cls(self.model_args)
        self.pp_schedule = None
        self.has_first_stage = self.has_last_stage = True
        if self.parallel_dims.pp_enabled:
            parts = self.model_spec.pipeline(model, self.parallel_dims, self.job_config, self.device,
                                             self._pipeline_loss)
            self.pp_schedule = parts.schedule
            self.model_parts = parts.model_parts
            self.has_first_stage, self.has_last_stage = parts.has_first_stage, parts.has_last_stage
        else:
            self.model_parts = [self.model_spec.parallelize(model, self.parallel_dims, self.job_config,
                                                            self.device)]
        self._uninitialized = []
        training = self.job_config.training
        for part in self.model_parts:
            if any(p.is_meta for p in part.parameters()):
                # Materialized, initialized only if no checkpoint overwrites it (``_init_if_fresh``);
                # buffers that no checkpoint holds now.
                part.to_empty(device=self.device)
                if hasattr(part, "init_buffers"):
                    part.init_buffers(self.device)
                self._uninitialized.append(part)
            part.train()
            if hasattr(part, "set_tokens_per_step"):  # a mixture of experts weighs its balancing loss
                part.set_tokens_per_step(training.local_batch_size * training.seq_len // self.parallel_dims.cp
                                         * self.grad_accum_steps)
        num_params = self.model_args.num_params()
        active = getattr(self.model_args, "num_active_params", lambda: num_params)()
        logger.info("model %s %s: %.2fM parameters%s, layout %s", self.model_spec.name, self.job_config.model.flavor,
                    num_params / 1e6, f" ({active / 1e6:.2f}M active per token)" if active != num_params else "",
                    self.parallel_dims.degrees)

    def _init_if_fresh(self, loaded: bool) -> None:
        """Initialize the weights unless a checkpoint provided them (it provides all of them, or
        none). The model is built only allocated when a resume is expected (a restore overwrites
        every weight); otherwise it is initialized at once, in ``__init__``."""
        if not loaded:
            for part in self._uninitialized:
                self.model_spec.init_weights(part, self.job_config.debug.seed, self.device)
        self._uninitialized = []

    def _pipeline_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy_loss(logits, labels) / self.grad_accum_steps

    def _set_determinism(self, debug) -> None:
        torch.manual_seed(debug.seed)
        random.seed(debug.seed + self.rank)  # Python's own generator too, as RNGState saves it
        if debug.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False

    # --- one step -----------------------------------------------------------------------

    def train_step(self) -> dict[str, float]:
        if self._uninitialized:  # a caller that stepped without train(): what it loaded, or fresh weights
            self._init_if_fresh(self.checkpointer.last_load is not None)
        self.optimizers.zero_grad()
        local_loss = torch.zeros((), device=self.device)
        for _ in range(self.grad_accum_steps):
            inputs, labels = self.dataloader.next_batch()
            if self.context_parallel is not None:
                inputs, labels = self.context_parallel.shard(inputs), self.context_parallel.shard(labels)
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            if self.pp_schedule is not None:
                local_loss += self._pipeline_forward_backward(inputs, labels)
            else:
                with self._autocast():
                    logits = self.model_parts[0](inputs)
                loss = cross_entropy_loss(logits, labels) / self.grad_accum_steps
                loss.backward()
                local_loss += loss.detach()

        params = [p for part in self.model_parts for p in part.parameters()]
        pp_group = self.mesh["pp"].get_group() if self.parallel_dims.pp_enabled else None
        grad_norm = clip_grad_norm_(params, self.job_config.training.max_norm, pp_group=pp_group)
        self.checkpointer.maybe_wait_for_staging()
        lr = self.lr_schedulers.last_lr  # the rate this step's update uses
        self.optimizers.step()
        self.lr_schedulers.step()
        # After the staged copy of a save in flight is taken (maybe_wait_for_staging): the MoE
        # balancing bias changes here, outside the optimizer.
        moe_metrics = self._after_optimizer_step()
        return {"loss": self._global_loss(local_loss), "grad_norm": grad_norm.item(), "lr": lr, **moe_metrics}

    def _after_optimizer_step(self) -> dict[str, float]:
        """Model state that trains outside the optimizer (a mixture of experts' balancing bias)."""
        metrics: dict[str, float] = {}
        for part in self.model_parts:
            hook = getattr(part, "after_optimizer_step", None)
            if hook is not None:
                for name, value in hook(self.parallel_dims.stage_mesh.get_group()).items():
                    metrics[name] = max(metrics.get(name, value), value)
        return metrics

    def _autocast(self):
        """bf16 compute on GPUs without FSDP (FSDP's MixedPrecisionPolicy covers the sharded case)."""
        dtype = getattr(torch, self.job_config.training.mixed_precision_param)
        dims = self.parallel_dims
        enabled = (self.device.type == "cuda" and dtype != torch.float32
                   and not (dims.fsdp_enabled or dims.dp_replicate_enabled))
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    def _pipeline_forward_backward(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels if self.has_last_stage else None
        losses: list[torch.Tensor] | None = [] if self.has_last_stage else None
        if self.has_first_stage:
            self.pp_schedule.step(inputs, target=targets, losses=losses)
        else:
            self.pp_schedule.step(target=targets, losses=losses)
        if not self.has_last_stage:
            return torch.zeros((), device=self.device)
        # The schedule divides each microbatch's mean loss by the number of microbatches (and
        # _pipeline_loss by grad_accum_steps), so their sum is this micro-step's share of the mean.
        return torch.stack([loss.detach() for loss in losses]).sum()

    def _global_loss(self, local_loss: torch.Tensor) -> float:
        """Mean loss over the global batch: every rank that holds a last stage contributes (under
        context parallelism each its share of the tokens, all shares of one size)."""
        contributing = self.world_size // self.parallel_dims.pp
        value = local_loss.detach().float().reshape(1).clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value.item() / contributing

    # --- the loop -----------------------------------------------------------------------

    def train(self) -> None:
        job_config = self.job_config
        ckpt_config = job_config.checkpoint
        if ckpt_config.create_seed_checkpoint:
            self._init_if_fresh(False)
            self._create_seed_checkpoint()
            return
        loaded = self.checkpointer.load()
        self._init_if_fresh(bool(loaded))
        self.clock.lap("resume")
        if loaded.kind in ("model_only", "hf") and not loaded.explicit \
                and loaded.step is not None and loaded.step >= job_config.training.steps:
            self.train_state.step = loaded.step  # a finished run's export: nothing is left to do
        self.metrics = MetricsLogger(job_config.metrics, job_config.job.dump_folder, rank=self.rank,
                                     append=bool(loaded))
        if loaded:  # where a resumed run picks up (`cairn checkpoint plot`)
            self.metrics.event(self.train_state.step, "checkpoint_load", **loaded.record())
        total_steps = job_config.training.steps
        stop_at = min(total_steps, job_config.debug.exit_after_step or total_steps)
        tokens_per_step = (self.dataloader.global_batch_size * job_config.training.seq_len)
        logger.info("training from step %d to %d (global batch %d sequences x %d tokens, grad accumulation %d)",
                    self.train_state.step, total_steps, self.dataloader.global_batch_size,
                    job_config.training.seq_len, self.grad_accum_steps)
        try:
            with GarbageCollection(job_config.training.gc_freq) as collector:
                self._train_loop(stop_at, total_steps, tokens_per_step, collector)
        finally:
            self.checkpointer.close()
            self.metrics.close()
        if self.train_state.step < total_steps:
            logger.info("stopped after step %d of %d (--debug.exit_after_step)", self.train_state.step, total_steps)
        else:
            logger.info("training done at step %d", self.train_state.step)

    def _train_loop(self, stop_at: int, total_steps: int, tokens_per_step: int,
                    collector: GarbageCollection) -> None:
        while self.train_state.step < stop_at:
            start = time.perf_counter()
            self.train_state.step += 1
            step = self.train_state.step
            collector.run(step)
            out = self.train_step()
            self.train_state.tokens_seen += tokens_per_step
            step_time = dist_max(time.perf_counter() - start)
            saving = self.checkpointer.enabled and not self.job_config.checkpoint.load_only
            self.metrics.log(step, {**out,
                                    "tokens_per_second": tokens_per_step / step_time,
                                    "step_time_ms": step_time * 1e3,
                                    "memory_gib": memory_gib(self.device),
                                    "tokens_seen": self.train_state.tokens_seen,
                                    **({"steps_at_risk": self.checkpointer.steps_at_risk(step)} if saving else {})})
            saved = self.checkpointer.save(step, last_step=step == total_steps, stopping=step == stop_at)
            if self.clock is not None:  # the first step of this start: where the start's time went
                self.clock.lap("first_step")
                self.metrics.event(step, "startup", **self.clock.record())
                self.clock = None
            self._log_save(step, saved)

    def _log_save(self, step: int, saved) -> None:
        """The checkpointer's report of this step into metrics.jsonl: saves lost to a dead writer,
        the memory snapshot of the step before (its cost shows in this step's time), a save or
        its deferral."""
        for lost in saved.lost_saves:
            self.metrics.event(lost.get("step") or step, "checkpoint_save_lost",
                               **{key: value for key, value in lost.items() if key != "step"})
        if saved.memory is not None:
            snapshot = dict(saved.memory)
            self.metrics.event(snapshot.pop("step", step), "memory_snapshot_skipped" if snapshot.get("skipped")
                               else "memory_snapshot", **snapshot)
        if saved.action != "skipped":
            event = "checkpoint_deferred" if saved.action in ("deferred", "coalesced") else "checkpoint_save"
            self.metrics.event(step, event, **saved.record())

    def _create_seed_checkpoint(self) -> None:
        degrees = self.parallel_dims.degrees
        if self.world_size != 1 or any(degrees[k] != 1 for k in ("dp_replicate", "dp_shard", "tp", "pp")):
            raise ConfigError([
                "--checkpoint.create_seed_checkpoint runs on one process with every parallelism degree 1: "
                f"got world size {self.world_size} and {degrees}; use NGPU=1 and "
                "--parallelism.data_parallel_shard_degree 1 --parallelism.tensor_parallel_degree 1 "
                "--parallelism.pipeline_parallel_degree 1 --parallelism.data_parallel_replicate_degree 1"])
        self.checkpointer.save_seed()
        self.checkpointer.close()

    def close(self) -> None:
        """Give the checkpoint folder back (a run that failed part way holds its lease) and leave the group."""
        checkpointer = getattr(self, "checkpointer", None)
        if checkpointer is not None:
            checkpointer.close()
        if dist.is_initialized():
            dist.destroy_process_group()
