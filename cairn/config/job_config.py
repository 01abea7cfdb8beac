"""The job configuration: one typed, nested dataclass per component.

Every field carries an attribute docstring: tyro turns it into the ``--help`` text
of the matching ``--section.field`` flag, and a reader finds each knob's meaning
beside it. This module imports no torch so that ``--help`` and config checks are fast.

Each section offers ``problems()``: a list of messages, each naming the flag it is
about. ``ConfigManager`` collects the problems of every section (and the
cross-section ones) and raises them together, once. The checkpoint section is also the
checkpoint library's ``CheckpointManager.Config``: its messages name fields the library's
way (``Config.interval``), and ``as_flags`` turns them into the trainer's flags.
"""

from __future__ import annotations

import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")
ASYNC_MODES = ("disabled", "async", "async_with_pinned_mem")
ASYNC_WRITERS = ("process", "thread")
DEVICE_SNAPSHOT = ("auto", "on", "off")
WHEN_BUSY = ("wait", "coalesce", "defer")
# What a full checkpoint holds besides the model; keys a user may exclude from loading.
EXCLUDABLE_STATES = ("optimizer", "lr_scheduler", "dataloader", "train_state", "rng")
# Spellings users paste from torchtitan's docs, mapped to cairn's state keys.
STATE_KEY_ALIASES = {"data_loader": "dataloader", "lr_schedulers": "lr_scheduler", "optimizers": "optimizer"}


def type_matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` is of the (resolved) annotation of a config field."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(type_matches(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(type_matches(v, item) for v in value)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is Any:
        return True
    return isinstance(value, annotation)


def _type_name(annotation: Any) -> str:
    return annotation.__name__ if isinstance(annotation, type) else str(annotation).replace("NoneType", "None")


def _split_commas(values: list[str]) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]``: CLI lists may be comma-separated."""
    out: list[str] = []
    for value in values:
        out.extend(part.strip() for part in str(value).split(",") if part.strip())
    return out


@dataclass(kw_only=True, slots=True)
class JobSection:
    dump_folder: str = "./outputs"
    """Folder for everything a run writes: checkpoints, metrics.jsonl, TensorBoard logs."""
    description: str = "cairn training job"
    """Free text written into logs and checkpoint manifests."""
    config_file: str | None = None
    """A TOML file whose [section] tables override the run config (CLI flags override both)."""

    def problems(self) -> list[str]:
        return [] if self.dump_folder else ["--job.dump_folder must not be empty"]


@dataclass(kw_only=True, slots=True)
class ModelSection:
    name: str = "llama3"
    """Model family (a folder under cairn/models)."""
    flavor: str = "debugmodel"
    """Model size within the family: debugmodel, 1B, 3B, 8B, 70B, 405B for llama3; debugmodel,
    moe_debugmodel, 0.6B, 1.7B, 4B, 8B, 14B, 32B, 30B-A3B, 235B-A22B for qwen3."""
    hf_assets_path: str | None = None
    """Folder with Hugging Face files (config.json, tokenizer, safetensors): the source of
    --checkpoint.initial_load_in_hf when no --checkpoint.initial_load_path is given, and of
    tokenizer files copied into HF exports. `--hf_assets_path` is accepted as an alias."""
    tokenizer_path: str = "assets/tokenizer/tokenizer.json"
    """A Hugging Face tokenizers `tokenizer.json` (relative paths resolve against the repo)."""

    def problems(self) -> list[str]:
        return [] if self.flavor else ["--model.flavor must not be empty"]


@dataclass(kw_only=True, slots=True)
class TrainingSection:
    steps: int = 50
    """Number of optimizer steps to train for."""
    local_batch_size: int = 8
    """Sequences per data-parallel rank per micro-step."""
    global_batch_size: int = -1
    """Sequences per optimizer step across all data-parallel ranks; -1 means
    local_batch_size x data-parallel degree. A multiple of that product turns on
    gradient accumulation."""
    seq_len: int = 128
    """Tokens per training sequence."""
    max_norm: float = 1.0
    """Gradient clipping: maximum global L2 norm of the gradients (<= 0 disables clipping)."""
    mixed_precision_param: str = "bfloat16"
    """Parameter dtype for compute under FSDP on GPUs (CPU runs always compute in float32)."""
    mixed_precision_reduce: str = "float32"
    """Gradient reduction dtype under FSDP on GPUs."""
    gc_freq: int = 50
    """Python garbage collection every this many steps (generation 1), with automatic
    collection off meanwhile; 0 leaves Python's automatic collection on. A full automatic
    collection walks every object of the process (~0.1 s) whenever allocations cross a
    threshold, in whichever thread allocates, and an async save's planning triggers one."""

    def problems(self) -> list[str]:
        out = []
        if self.steps < 0:
            out.append(f"--training.steps must be >= 0 (got {self.steps})")
        if self.local_batch_size < 1:
            out.append(f"--training.local_batch_size must be >= 1 (got {self.local_batch_size})")
        if self.global_batch_size == 0 or self.global_batch_size < -1:
            out.append(f"--training.global_batch_size must be -1 or >= 1 (got {self.global_batch_size})")
        if self.seq_len < 1:
            out.append(f"--training.seq_len must be >= 1 (got {self.seq_len})")
        if self.gc_freq < 0:
            out.append(f"--training.gc_freq must be >= 0 (0: Python's automatic collection; got {self.gc_freq})")
        for flag, value in (("mixed_precision_param", self.mixed_precision_param),
                            ("mixed_precision_reduce", self.mixed_precision_reduce)):
            if value not in DTYPES:
                out.append(f"--training.{flag} must be one of {', '.join(DTYPES)} (got {value!r})")
        return out


@dataclass(kw_only=True, slots=True)
class OptimizerSection:
    name: str = "AdamW"
    """Optimizer class: AdamW or Adam."""
    lr: float = 8e-4
    """Peak learning rate."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1

    def problems(self) -> list[str]:
        out = []
        if self.name not in ("AdamW", "Adam"):
            out.append(f"--optimizer.name must be AdamW or Adam (got {self.name!r})")
        if self.lr <= 0:
            out.append(f"--optimizer.lr must be > 0 (got {self.lr})")
        if self.eps <= 0:
            out.append(f"--optimizer.eps must be > 0 (got {self.eps})")
        for flag, value in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0.0 <= value < 1.0:
                out.append(f"--optimizer.{flag} must be in [0, 1) (got {value})")
        return out


@dataclass(kw_only=True, slots=True)
class LRSchedulerSection:
    warmup_steps: int = 2
    """Steps of linear warmup from lr/(warmup_steps+1) to the peak lr."""
    decay_ratio: float | None = None
    """Fraction of the steps after warmup spent decaying (None: decay over all of them)."""
    decay_type: str = "linear"
    """Shape of the decay: linear, cosine or sqrt."""
    min_lr_factor: float = 0.0
    """The decay ends at lr x min_lr_factor."""

    def problems(self) -> list[str]:
        out = []
        if self.warmup_steps < 0:
            out.append(f"--lr_scheduler.warmup_steps must be >= 0 (got {self.warmup_steps})")
        if self.decay_type not in ("linear", "cosine", "sqrt"):
            out.append(f"--lr_scheduler.decay_type must be linear, cosine or sqrt (got {self.decay_type!r})")
        if self.decay_ratio is not None and not 0.0 <= self.decay_ratio <= 1.0:
            out.append(f"--lr_scheduler.decay_ratio must be in [0, 1] (got {self.decay_ratio})")
        if not 0.0 <= self.min_lr_factor <= 1.0:
            out.append(f"--lr_scheduler.min_lr_factor must be in [0, 1] (got {self.min_lr_factor})")
        return out


@dataclass(kw_only=True, slots=True)
class ParallelismSection:
    data_parallel_replicate_degree: int = 1
    """Replicas of the model (DDP-style; with shard degree > 1 this is HSDP)."""
    data_parallel_shard_degree: int = -1
    """FSDP2 sharding degree; -1 takes what the world size leaves after the other degrees."""
    tensor_parallel_degree: int = 1
    """Tensor parallel degree (Megatron-style column/row sharding of attention and MLP)."""
    pipeline_parallel_degree: int = 1
    """Pipeline stages (layers split across ranks, torch.distributed.pipelining)."""
    context_parallel_degree: int = 1
    """Context parallel degree: each sequence is split over this many ranks (causal load balancing:
    rank r holds chunks r and 2N-1-r of 2N), which see the same sequences and shard the parameters
    with FSDP (over data_parallel_shard_degree x this). --training.seq_len must be divisible by 2N."""
    context_parallel_attention: str = "auto"
    """Attention across the sequence shards: allgather (K/V all-gathered over the CP ranks, any
    device), ring (torch's ring attention, CUDA only), auto (ring on CUDA, allgather elsewhere)."""
    expert_parallel_degree: int = 1
    """Expert parallel degree of a mixture-of-experts model: the routed experts of each layer are
    split over this many ranks and tokens travel to their experts by all-to-all. Borrows its ranks
    from FSDP, CP and TP: it must divide data_parallel_shard_degree x context_parallel_degree x
    tensor_parallel_degree, and the model's number of experts."""
    pipeline_parallel_schedule: str = "1F1B"
    """Pipeline schedule: 1F1B, GPipe, Interleaved1F1B."""
    pipeline_parallel_microbatch_size: int = 1
    """Sequences per pipeline microbatch."""

    def problems(self) -> list[str]:
        out = []
        for name in ("data_parallel_replicate_degree", "tensor_parallel_degree",
                     "pipeline_parallel_degree", "context_parallel_degree", "expert_parallel_degree"):
            if getattr(self, name) < 1:
                out.append(f"--parallelism.{name} must be >= 1 (got {getattr(self, name)})")
        if self.data_parallel_shard_degree == 0 or self.data_parallel_shard_degree < -1:
            out.append("--parallelism.data_parallel_shard_degree must be -1 or >= 1 "
                       f"(got {self.data_parallel_shard_degree})")
        if self.context_parallel_attention not in ("auto", "allgather", "ring"):
            out.append("--parallelism.context_parallel_attention must be auto, allgather or ring "
                       f"(got {self.context_parallel_attention!r})")
        if self.pipeline_parallel_schedule not in ("1F1B", "GPipe", "Interleaved1F1B"):
            out.append("--parallelism.pipeline_parallel_schedule must be 1F1B, GPipe or Interleaved1F1B "
                       f"(got {self.pipeline_parallel_schedule!r})")
        if self.pipeline_parallel_microbatch_size < 1:
            out.append("--parallelism.pipeline_parallel_microbatch_size must be >= 1")
        return out


@dataclass(kw_only=True, slots=True)
class CheckpointSection:
    enable: bool = False
    """Save checkpoints (and resume from them). Off: nothing is saved or loaded."""
    folder: str = "checkpoint"
    """Where step-N folders go: relative to --job.dump_folder (a CheckpointManager's base_folder), an
    absolute path, or object storage
    (s3://bucket/prefix; credentials and endpoint as for every AWS tool, AWS_ENDPOINT_URL for
    S3-compatible stores)."""
    upload_to: str | None = None
    """Also keep every committed step in object storage (s3://bucket/prefix): uploaded in the
    background after each local commit, retention applied there too. Resume takes the newest
    committed step of either place, so a lost machine loses no step that finished uploading."""
    s3_unsafe_no_conditional_writes: bool = False
    """Use an s3:// store (folder or upload_to) that does not honour conditional writes
    (If-None-Match / If-Match), which cairn otherwise refuses at start: nothing then stops two
    runs from sharing the folder, or one save from overwriting another's commit."""
    interval: int = 500
    """Save every this many steps (the last step is always saved)."""
    keep_latest_k: int = 10
    """Keep the newest k committed steps, deleting older ones in the background; 0 keeps all."""
    load_step: int = -1
    """Step to resume from; -1 = the newest committed step. A missing step is an error."""
    last_save_model_only: bool = True
    """At the last step save the model only (no optimizer/data/RNG), cast to export_dtype: an
    export of the final weights, not a point to resume training from."""
    export_dtype: str = "float32"
    """Dtype of the model-only last save: float32, bfloat16 or float16."""
    exclude_from_loading: list[str] = field(default_factory=list)
    """States not to load on resume, comma-separated: optimizer, lr_scheduler, dataloader,
    train_state, rng (torchtitan's `data_loader` is accepted)."""
    enable_first_step_checkpoint: bool = False
    """Also save right after step 1."""
    create_seed_checkpoint: bool = False
    """Initialize the model on one CPU process, save it as step-0 and exit."""
    initial_load_path: str | None = None
    """Checkpoint (DCP step folder, or HF folder with --checkpoint.initial_load_in_hf) to start
    from when the checkpoint folder holds no step yet; ignored once a step exists."""
    initial_load_model_only: bool = True
    """Load only the model from initial_load_path (fine-tuning); off: the full training state."""
    initial_load_in_hf: bool = False
    """The initial load is Hugging Face safetensors (initial_load_path or --model.hf_assets_path)."""
    last_save_in_hf: bool = False
    """Write the last (model-only) save as Hugging Face safetensors + config.json."""
    load_only: bool = False
    """Load checkpoints but never save any."""
    async_mode: str = "disabled"
    """disabled, async (background write), or async_with_pinned_mem (reused pinned staging buffers)."""
    when_busy: str = "wait"
    """An async save that comes due while the previous one is still being written: wait (training
    waits until the previous save is committed, then saves: a crash loses at most the interval
    plus the steps of the one save being written; each wait is a warning and waited_s),
    coalesce (training goes on; this step's state is staged into a second set of host buffers,
    twice the host memory, and written as soon as the previous save commits, a newer due state
    replacing it while it waits) or defer (training goes on; the save is taken at the first
    step after the previous one commits). coalesce and defer never stall training, but a crash
    may then lose more than the interval: each such save says so (a warning and its result's
    steps_at_risk). Figures: benchmarks/RESULTS.md, "when a save is due while one is written"."""
    async_writer: str = "process"
    """Who writes an async save's files: process (a child process, so the writes never take
    the training loop's GIL; Linux) or thread (a thread of the training process)."""
    device_snapshot: str = "auto"
    """on: async saves first copy the state into device memory (HBM to HBM, milliseconds), so
    the optimizer step waits only for that, not for the copy to host; it costs device memory
    equal to the rank's checkpoint shard, kept for the run. auto: on for async_with_pinned_mem
    when, after the first step, that much device memory is free with 10% of the device (at
    least 4 GiB) to spare; off otherwise. off: never."""
    verify: bool = True
    """Check every file's checksum while it is loaded (one pass over the disk; a mismatch fails the
    load naming the file); --checkpoint.no-verify checks sizes only. On the 1B benchmark a
    verified cold load took 0.92-1.00 of a plain one (benchmarks/RESULTS.md, session 7)."""
    write_threads: int = 1
    """Threads (and files) per rank writing a full save. More write host-memory state faster
    (benchmarks/storage_bench.py), but DCP then copies GPU tensors without overlap and the
    threads compete with training: on the 1B/H100 benchmark 4 made sync saves 1.5x slower
    and the async stall 2x larger (benchmarks/RESULTS.md)."""
    fallback_on_corrupt: bool = False
    """On auto-resume, skip a corrupt newest step and load the newest valid one (logged)."""
    memory_interval: int = 0
    """Also snapshot the whole training state into host memory every this many steps (0: off).
    Snapshots outlive the training process (tmpfs), so a restart after a crash resumes from the
    newest one when it is at least as new as the newest disk step: seconds, and at most this
    many steps lost. Costs host memory of twice the rank's state (four times with replicas)."""
    memory_replicas: int = 0
    """1: also keep a copy of each rank's snapshot on the next node (the rank LOCAL_WORLD_SIZE
    further on), so a node that is lost and replaced restores from its neighbours' memory."""
    memory_dir: str | None = None
    """Where this node keeps the snapshots (default: /dev/shm/cairn-<hash of the checkpoint folder>)."""

    def normalize(self) -> None:
        # Seed 000's command gives --checkpoint.create_seed_checkpoint without --checkpoint.enable.
        if self.create_seed_checkpoint:
            self.enable = True
        keys = _split_commas(self.exclude_from_loading)
        self.exclude_from_loading = [STATE_KEY_ALIASES.get(k, k) for k in keys]

    def problems(self, states: typing.Iterable[str] | None = None) -> list[str]:
        """Every problem of this config, each naming its field the library's way (``Config.interval``;
        ``as_flags`` gives the trainer's flags). ``states``: the state keys ``exclude_from_loading``
        may name (default: the trainer's)."""
        hints = typing.get_type_hints(CheckpointSection)
        wrong = [f"Config.{name} must be of type {_type_name(hints[name])} (got {getattr(self, name)!r})"
                 for name in CheckpointSection.__dataclass_fields__ if not type_matches(getattr(self, name), hints[name])]
        if wrong:
            return wrong  # the checks below compare values; a value of the wrong type cannot be compared
        excludable = tuple(EXCLUDABLE_STATES if states is None else states)
        out = []
        if self.interval < 1:
            out.append(f"Config.interval must be >= 1 (got {self.interval})")
        if self.keep_latest_k < 0:
            out.append(f"Config.keep_latest_k must be >= 0, 0 keeps all (got {self.keep_latest_k})")
        if self.load_step < -1:
            out.append(f"Config.load_step must be -1 (latest) or a step >= 0 (got {self.load_step})")
        if self.export_dtype not in DTYPES:
            out.append(f"Config.export_dtype must be one of {', '.join(DTYPES)} (got {self.export_dtype!r})")
        if self.async_mode not in ASYNC_MODES:
            out.append(f"Config.async_mode must be one of {', '.join(ASYNC_MODES)} (got {self.async_mode!r})")
        if not self.folder:
            out.append("Config.folder must not be empty")
        elif "://" in self.folder and not self.folder.lower().startswith("s3://"):
            out.append(f"Config.folder {self.folder}: unsupported storage scheme "
                       f"{self.folder.split('://')[0]}://; use a local or shared folder, or s3://bucket/prefix")
        if self.upload_to is not None:
            if not self.upload_to.lower().startswith("s3://"):
                out.append(f"Config.upload_to {self.upload_to}: expected s3://bucket/prefix")
            elif self.folder.lower().startswith("s3://"):
                out.append(f"Config.upload_to mirrors a local Config.folder; the folder is already {self.folder}")
        if self.device_snapshot not in DEVICE_SNAPSHOT:
            out.append(f"Config.device_snapshot must be one of {', '.join(DEVICE_SNAPSHOT)} "
                       f"(got {self.device_snapshot!r})")
        if self.when_busy not in WHEN_BUSY:
            out.append(f"Config.when_busy must be one of {', '.join(WHEN_BUSY)} (got {self.when_busy!r})")
        if self.async_writer not in ASYNC_WRITERS:
            out.append(f"Config.async_writer must be one of {', '.join(ASYNC_WRITERS)} (got {self.async_writer!r})")
        if self.write_threads < 1:
            out.append(f"Config.write_threads must be >= 1 (got {self.write_threads})")
        if self.memory_interval < 0:
            out.append(f"Config.memory_interval must be >= 0, 0 is off (got {self.memory_interval})")
        if self.memory_replicas not in (0, 1):
            out.append(f"Config.memory_replicas must be 0 or 1 (got {self.memory_replicas})")
        elif self.memory_replicas and not self.memory_interval:
            out.append("Config.memory_replicas needs Config.memory_interval > 0")
        if self.memory_interval and self.load_only:
            out.append("Config.memory_interval takes snapshots; Config.load_only takes none")
        if self.memory_dir is not None and ("://" in self.memory_dir or not self.memory_dir):
            out.append(f"Config.memory_dir {self.memory_dir!r}: expected a local folder (e.g. under /dev/shm)")
        for key in self.exclude_from_loading:
            if key == "model":
                out.append("Config.exclude_from_loading cannot exclude 'model': a checkpoint load always restores "
                           "the model (use a fresh Config.folder to start anew)")
            elif key not in excludable:
                out.append(f"Config.exclude_from_loading: unknown key {key!r}; "
                           f"choose from {', '.join(excludable) or 'nothing (no states were passed)'}")
        if ("optimizer" in self.exclude_from_loading and "lr_scheduler" in excludable
                and "lr_scheduler" not in self.exclude_from_loading):
            out.append("Config.exclude_from_loading: excluding 'optimizer' also needs 'lr_scheduler' "
                       "(the schedule's step count belongs to the optimizer state it drives)")
        if self.last_save_in_hf and not self.last_save_model_only:
            out.append("Config.last_save_in_hf needs Config.last_save_model_only (HF checkpoints hold model weights "
                       "only)")
        if self.create_seed_checkpoint and self.load_only:
            out.append("Config.create_seed_checkpoint cannot be combined with Config.load_only")
        return out


_CONFIG_FIELD = re.compile(r"\bConfig\.([A-Za-z_]+)")


def as_flags(message: str) -> str:
    """A checkpoint library message in the trainer's words: ``Config.interval`` -> ``--checkpoint.interval``."""
    fields = CheckpointSection.__dataclass_fields__
    return _CONFIG_FIELD.sub(lambda m: f"--checkpoint.{m.group(1)}" if m.group(1) in fields else m.group(0), message)


@dataclass(kw_only=True, slots=True)
class DataloaderSection:
    dataset: str = "bundled"
    """`bundled` (the small corpus in assets/, no network) or a path to a .txt, .jsonl or
    .parquet file, or a folder of them."""
    text_field: str = "text"
    """The text column of jsonl/parquet records."""
    shuffle: bool = True
    """Shuffle packed sequences within each epoch (seeded by --debug.seed)."""

    def problems(self) -> list[str]:
        return [] if self.dataset else ["--dataloader.dataset must not be empty"]


@dataclass(kw_only=True, slots=True)
class MetricsSection:
    log_freq: int = 1
    """Log to the console every this many steps (metrics.jsonl gets every step)."""
    enable_tensorboard: bool = True
    """Write TensorBoard event files under <dump_folder>/tb."""
    enable_jsonl: bool = True
    """Write one JSON object per step to <dump_folder>/metrics.jsonl."""

    def problems(self) -> list[str]:
        return [] if self.log_freq >= 1 else [f"--metrics.log_freq must be >= 1 (got {self.log_freq})"]


@dataclass(kw_only=True, slots=True)
class ActivationCheckpointSection:
    mode: str = "none"
    """none, or full (recompute each transformer block in the backward pass)."""

    def problems(self) -> list[str]:
        if self.mode not in ("none", "full"):
            return [f"--activation_checkpoint.mode must be none or full (got {self.mode!r})"]
        return []


@dataclass(kw_only=True, slots=True)
class CompileSection:
    enable: bool = False
    """torch.compile each transformer block."""

    def problems(self) -> list[str]:
        return []


@dataclass(kw_only=True, slots=True)
class DebugSection:
    seed: int = 42
    """Seed for weight init, data order and every rank's RNG."""
    deterministic: bool = False
    """Use deterministic algorithms (torch.use_deterministic_algorithms)."""
    log_level: str = "INFO"
    """Logging level: DEBUG, INFO, WARNING."""
    exit_after_step: int = 0
    """Stop cleanly after this step, as a preemption would (pending saves finish); the LR
    schedule still spans --training.steps, so a later run resumes where this one stopped. 0: off."""

    def problems(self) -> list[str]:
        if self.exit_after_step < 0:
            return [f"--debug.exit_after_step must be >= 0 (got {self.exit_after_step})"]
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            return [f"--debug.log_level must be DEBUG, INFO, WARNING or ERROR (got {self.log_level!r})"]
        return []


@dataclass(kw_only=True, slots=True)
class JobConfig:
    """A whole cairn run. Ways in, lowest first: defaults, a Python run config
    (--module/--config), a TOML file (--job.config_file), CLI flags."""

    job: JobSection = field(default_factory=JobSection)
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    lr_scheduler: LRSchedulerSection = field(default_factory=LRSchedulerSection)
    parallelism: ParallelismSection = field(default_factory=ParallelismSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    dataloader: DataloaderSection = field(default_factory=DataloaderSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    activation_checkpoint: ActivationCheckpointSection = field(default_factory=ActivationCheckpointSection)
    compile: CompileSection = field(default_factory=CompileSection)
    debug: DebugSection = field(default_factory=DebugSection)

    def sections(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def problems(self) -> list[str]:
        out = []
        for section in self.sections().values():
            out.extend(as_flags(problem) for problem in section.problems())
        cp, seq_len = self.parallelism.context_parallel_degree, self.training.seq_len
        if cp > 1 and seq_len >= 1 and seq_len % (2 * cp):
            out.append(f"--training.seq_len ({seq_len}) must be divisible by 2 x --parallelism.context_parallel_degree "
                       f"({cp}) = {2 * cp}: each context-parallel rank holds 2 of {2 * cp} equal chunks of a sequence")
        ckpt = self.checkpoint
        if ckpt.initial_load_in_hf and not (ckpt.initial_load_path or self.model.hf_assets_path):
            out.append("--checkpoint.initial_load_in_hf needs --checkpoint.initial_load_path or "
                       "--model.hf_assets_path (also spelled --hf_assets_path)")
        return out
