"""The config layers: run configs, TOML files, CLI flags, and the errors they produce."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cairn.config import ConfigError, parse_args
from cairn.config.manager import available_run_configs
from cairn.distributed.parallel_dims import ParallelDims
from cairn.models.llama3 import Transformer, llama3_flavors

REPO = Path(__file__).resolve().parents[2]
TOMLS = sorted((REPO / "train_configs").glob("*.toml"))


@pytest.mark.parametrize("name", sorted(available_run_configs("llama3")))
def test_every_run_config_parses_and_builds(name):
    config = parse_args(["--module", "llama3", "--config", name])
    assert config.model.flavor in llama3_flavors
    args = copy.deepcopy(llama3_flavors[config.model.flavor])
    with torch.device("meta"):
        model = Transformer(args)
    assert "tok_embeddings.weight" in model.state_dict()


@pytest.mark.parametrize("path", TOMLS, ids=[p.name for p in TOMLS])
def test_every_shipped_toml_parses(path):
    config = parse_args(["--job.config_file", str(path)])
    assert config.job.config_file == str(path)


def test_toml_then_cli_precedence(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('[checkpoint]\nenable = true\ninterval = 7\nexport_dtype = "bfloat16"\n'
                    '[training]\nsteps = 3\n')
    config = parse_args(["--module", "llama3", "--config", "llama3_tiny", "--job.config_file", str(toml),
                         "--checkpoint.interval=9"])
    assert config.checkpoint.enable and config.checkpoint.interval == 9
    assert config.checkpoint.export_dtype == "bfloat16" and config.training.steps == 3
    assert config.model.flavor == "tiny"  # from the run config, untouched by the TOML


def test_seed_004_full_example_as_written():
    config = parse_args(["--job.config_file", str(REPO / "train_configs/checkpoint_full_example.toml")])
    ckpt = config.checkpoint
    assert ckpt.enable and ckpt.load_step == -1 and ckpt.async_mode == "async"
    assert ckpt.last_save_model_only and ckpt.export_dtype == "bfloat16" and ckpt.exclude_from_loading == []


def test_cli_forms():
    config = parse_args(["--checkpoint.enable", "--checkpoint.exclude_from_loading", "data_loader,lr_scheduler",
                         "--hf_assets_path", "/some/dir", "--training.steps=5", "--checkpoint.no-last_save_model_only"])
    assert config.checkpoint.enable
    assert config.checkpoint.exclude_from_loading == ["dataloader", "lr_scheduler"]
    assert config.model.hf_assets_path == "/some/dir"
    assert config.training.steps == 5
    assert not config.checkpoint.last_save_model_only


def test_seed_000_seed_checkpoint_command_parses_as_written():
    config = parse_args(["--module", "llama3", "--config", "llama3_debugmodel", "--checkpoint.create_seed_checkpoint",
                         "--parallelism.data_parallel_replicate_degree", "1",
                         "--parallelism.data_parallel_shard_degree", "1", "--parallelism.tensor_parallel_degree", "1",
                         "--parallelism.pipeline_parallel_degree", "1", "--parallelism.context_parallel_degree", "1",
                         "--parallelism.expert_parallel_degree", "1"])
    assert config.checkpoint.create_seed_checkpoint and config.checkpoint.enable


def test_all_problems_reported_once():
    with pytest.raises(ConfigError) as info:
        parse_args(["--checkpoint.interval", "0", "--checkpoint.export_dtype", "int8",
                    "--checkpoint.exclude_from_loading", "model,bogus", "--training.seq_len", "0",
                    "--parallelism.context_parallel_degree", "0", "--checkpoint.write_threads", "0",
                    "--checkpoint.async_writer", "fork", "--training.gc_freq", "-1",
                    "--checkpoint.device_snapshot", "yes"])
    message = str(info.value)
    for flag in ("--checkpoint.interval", "--checkpoint.export_dtype", "'model'", "'bogus'",
                 "--training.seq_len", "--parallelism.context_parallel_degree", "--checkpoint.write_threads",
                 "--checkpoint.async_writer", "--training.gc_freq", "--checkpoint.device_snapshot"):
        assert flag in message
    assert len(info.value.problems) == 10


@pytest.mark.parametrize("args,needle", [
    (["--checkpoint.memory_interval", "-1"], "--checkpoint.memory_interval must be >= 0"),
    (["--checkpoint.memory_interval", "2", "--checkpoint.memory_replicas", "2"], "--checkpoint.memory_replicas must"),
    (["--checkpoint.memory_replicas", "1"], "needs --checkpoint.memory_interval"),
    (["--checkpoint.memory_interval", "2", "--checkpoint.load_only"], "--checkpoint.load_only takes none"),
    (["--checkpoint.memory_interval", "2", "--checkpoint.memory_dir", "s3://b/x"], "--checkpoint.memory_dir"),
])
def test_memory_tier_flags_are_checked(args, needle):
    with pytest.raises(ConfigError) as info:
        parse_args(args)
    assert needle in str(info.value) and len(info.value.problems) == 1


def test_excluding_optimizer_needs_lr_scheduler():
    with pytest.raises(ConfigError, match="lr_scheduler"):
        parse_args(["--checkpoint.exclude_from_loading", "optimizer"])
    parse_args(["--checkpoint.exclude_from_loading", "optimizer,lr_scheduler"])


def test_toml_errors_name_file_and_key(tmp_path):
    toml = tmp_path / "bad.toml"
    toml.write_text('[checkpoint]\nintervall = 5\nenable = "yes"\n[nosuch]\nx = 1\n')
    with pytest.raises(ConfigError) as info:
        parse_args(["--job.config_file", str(toml)])
    message = str(info.value)
    assert "intervall" in message and "enable" in message and "[nosuch]" in message and str(toml) in message
    with pytest.raises(ConfigError, match="no such file"):
        parse_args(["--job.config_file", str(tmp_path / "missing.toml")])


def test_unknown_run_config_lists_choices():
    with pytest.raises(ConfigError, match="llama3_debugmodel"):
        parse_args(["--module", "llama3", "--config", "nope"])
    with pytest.raises(ConfigError, match="--module"):
        parse_args(["--module", "gpt9", "--config", "x"])


@pytest.mark.parametrize("degrees,world,flags", [
    (dict(dp_replicate=1, dp_shard=2, tp=2, pp=1), 8, ["data_parallel_shard_degree", "world size is 8"]),
    (dict(dp_replicate=3, dp_shard=-1, tp=1, pp=1), 4, ["data_parallel_replicate_degree", "-1"]),
])
def test_degrees_checked_against_world_size(degrees, world, flags):
    with pytest.raises(ConfigError) as info:
        ParallelDims(**degrees, world_size=world)
    for flag in flags:
        assert flag in str(info.value)


def test_dp_shard_takes_the_rest():
    dims = ParallelDims(dp_replicate=2, dp_shard=-1, tp=2, pp=1, world_size=8)
    assert dims.dp_shard == 2 and dims.dp_degree == 4


def test_help_lists_flags_with_meaning():
    out = subprocess.run([sys.executable, "-m", "cairn.train", "--help"], capture_output=True, text=True,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0
    assert "--checkpoint.interval" in out.stdout and "Save every this many steps" in out.stdout
    assert "--parallelism.tensor_parallel_degree" in out.stdout


def test_bad_flag_exits_2_with_message():
    out = subprocess.run([sys.executable, "-m", "cairn.train", "--checkpoint.async_mode", "sometimes"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2
    assert "--checkpoint.async_mode" in out.stderr
