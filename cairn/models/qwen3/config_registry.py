"""Run configs for Qwen3: each function returns a whole JobConfig.

Pick one with ``--module qwen3 --config <function>`` (``MODULE``/``CONFIG`` in run_train.sh);
TOML files and CLI flags apply on top. Variants call a base and change it.
"""

from cairn.config.job_config import JobConfig


def qwen3_debugmodel() -> JobConfig:
    """The tiny dense Qwen3 on the bundled corpus: trains in seconds on a CPU."""
    config = JobConfig()
    config.job.description = "qwen3 debug model"
    config.model.name = "qwen3"
    config.model.flavor = "debugmodel"
    config.training.steps = 50
    config.training.local_batch_size = 8
    config.training.seq_len = 128
    config.optimizer.lr = 8e-4
    config.lr_scheduler.warmup_steps = 2
    config.checkpoint.interval = 10
    return config


def qwen3_moe_debugmodel() -> JobConfig:
    """A tiny Qwen3-MoE (8 experts, top-2, load-balancing loss and auxiliary-loss-free bias): what the
    tests train, at any expert-parallel degree that divides the ranks (EP 1, 2, 4, 8)."""
    config = qwen3_debugmodel()
    config.job.description = "qwen3 moe debug model"
    config.model.flavor = "moe_debugmodel"
    config.training.steps = 20
    config.training.local_batch_size = 4
    config.training.seq_len = 32
    config.optimizer.lr = 1e-2
    config.metrics.enable_tensorboard = False
    return config


def qwen3_0_6b() -> JobConfig:
    config = JobConfig()
    config.job.description = "qwen3 0.6B"
    config.model.name = "qwen3"
    config.model.flavor = "0.6B"
    config.training.steps = 1000
    config.training.local_batch_size = 4
    config.training.seq_len = 2048
    config.optimizer.lr = 3e-4
    config.lr_scheduler.warmup_steps = 100
    config.checkpoint.interval = 500
    config.activation_checkpoint.mode = "full"
    return config


def qwen3_1_7b() -> JobConfig:
    config = qwen3_0_6b()
    config.job.description = "qwen3 1.7B"
    config.model.flavor = "1.7B"
    return config


def qwen3_4b() -> JobConfig:
    config = qwen3_0_6b()
    config.job.description = "qwen3 4B"
    config.model.flavor = "4B"
    config.training.local_batch_size = 2
    return config


def qwen3_8b() -> JobConfig:
    config = qwen3_0_6b()
    config.job.description = "qwen3 8B"
    config.model.flavor = "8B"
    config.training.local_batch_size = 1
    config.checkpoint.async_mode = "async_with_pinned_mem"
    return config


def qwen3_14b() -> JobConfig:
    config = qwen3_8b()
    config.job.description = "qwen3 14B"
    config.model.flavor = "14B"
    return config


def qwen3_32b() -> JobConfig:
    config = qwen3_8b()
    config.job.description = "qwen3 32B"
    config.model.flavor = "32B"
    config.parallelism.tensor_parallel_degree = 8
    return config


def qwen3_30b_a3b() -> JobConfig:
    """Qwen3-30B-A3B: 128 experts per layer, 8 routed per token; experts split over 8 ranks."""
    config = qwen3_8b()
    config.job.description = "qwen3 30B-A3B"
    config.model.flavor = "30B-A3B"
    config.parallelism.expert_parallel_degree = 8
    return config


def qwen3_235b_a22b() -> JobConfig:
    config = qwen3_30b_a3b()
    config.job.description = "qwen3 235B-A22B"
    config.model.flavor = "235B-A22B"
    config.parallelism.pipeline_parallel_degree = 8
    return config


def qwen3_moe_1gpu() -> JobConfig:
    """The largest Qwen3-MoE that trains on one H200 with fp32 AdamW (flavor 30B-A3B-L16-E64: 30B-A3B's
    shapes, 16 layers, 64 experts, 5.8B parameters): the checkpoint benchmark's MoE."""
    config = qwen3_8b()
    config.job.description = "qwen3 MoE, one GPU"
    config.model.flavor = "30B-A3B-L16-E64"
    config.training.local_batch_size = 2
    config.training.seq_len = 2048
    return config
