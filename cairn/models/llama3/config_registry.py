"""Run configs for Llama 3: each function returns a whole JobConfig.

Pick one with ``--module llama3 --config <function>`` (``MODULE``/``CONFIG`` in
run_train.sh); TOML files and CLI flags apply on top. Variants call a base and change it.
"""

from cairn.config.job_config import JobConfig


def llama3_debugmodel() -> JobConfig:
    """The tiny model on the bundled corpus: trains in seconds on a CPU."""
    config = JobConfig()
    config.job.description = "llama3 debug model"
    config.model.flavor = "debugmodel"
    config.training.steps = 50
    config.training.local_batch_size = 8
    config.training.seq_len = 128
    config.optimizer.lr = 8e-4
    config.lr_scheduler.warmup_steps = 2
    config.checkpoint.interval = 10
    return config


def llama3_tiny() -> JobConfig:
    """A 4-layer, 64-wide model with short sequences: what the test suite trains."""
    config = llama3_debugmodel()
    config.job.description = "llama3 tiny (tests)"
    config.model.flavor = "tiny"
    config.training.steps = 20
    config.training.local_batch_size = 4
    config.training.seq_len = 32
    config.metrics.enable_tensorboard = False
    return config


def llama3_debugmodel_ckpt() -> JobConfig:
    """The debug model with checkpointing on: every 10 steps, last save model-only in bf16."""
    config = llama3_debugmodel()
    config.checkpoint.enable = True
    config.checkpoint.interval = 10
    config.checkpoint.last_save_model_only = True
    config.checkpoint.export_dtype = "bfloat16"
    return config


def llama3_1b() -> JobConfig:
    config = JobConfig()
    config.job.description = "llama3.2 1B"
    config.model.flavor = "1B"
    config.model.tokenizer_path = "assets/tokenizer/tokenizer.json"
    config.training.steps = 1000
    config.training.local_batch_size = 4
    config.training.seq_len = 2048
    config.optimizer.lr = 3e-4
    config.lr_scheduler.warmup_steps = 100
    config.checkpoint.interval = 500
    config.activation_checkpoint.mode = "full"
    return config


def llama3_3b() -> JobConfig:
    config = llama3_1b()
    config.job.description = "llama3.2 3B"
    config.model.flavor = "3B"
    config.training.local_batch_size = 2
    return config


def llama3_8b() -> JobConfig:
    config = llama3_1b()
    config.job.description = "llama3.1 8B"
    config.model.flavor = "8B"
    config.training.local_batch_size = 1
    config.training.seq_len = 8192
    config.checkpoint.async_mode = "async_with_pinned_mem"
    return config


def llama3_70b() -> JobConfig:
    config = llama3_8b()
    config.job.description = "llama3.1 70B"
    config.model.flavor = "70B"
    config.parallelism.tensor_parallel_degree = 8
    return config


def llama3_405b() -> JobConfig:
    config = llama3_70b()
    config.job.description = "llama3.1 405B"
    config.model.flavor = "405B"
    config.parallelism.pipeline_parallel_degree = 8
    return config
