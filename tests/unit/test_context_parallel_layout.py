"""Context parallelism's layout and its errors, without a process group (the distributed checks
are tests/distributed/test_context_parallel.py)."""

from __future__ import annotations

import pytest
import torch

from cairn.config import parse_args
from cairn.config.manager import ConfigError
from cairn.distributed.context_parallel import load_balanced_positions
from cairn.distributed.parallel_dims import ParallelDims
from cairn.models.llama3.model import Transformer, TransformerModelArgs
from cairn.models.llama3.parallelize import parallelize_llama


@pytest.mark.parametrize("degree", [1, 2, 4])
def test_each_rank_holds_an_early_and_a_late_chunk_and_the_ranks_cover_the_sequence(degree):
    seq_len = 32
    chunk = seq_len // (2 * degree)
    held = [load_balanced_positions(seq_len, degree, rank) for rank in range(degree)]
    for rank, positions in enumerate(held):
        assert positions[:chunk].tolist() == list(range(rank * chunk, (rank + 1) * chunk))
        last = 2 * degree - 1 - rank
        assert positions[chunk:].tolist() == list(range(last * chunk, (last + 1) * chunk))
    # every position once, and each rank's causal work ((query, key) pairs) the same
    assert sorted(torch.cat(held).tolist()) == list(range(seq_len))
    assert len({int((positions + 1).sum()) for positions in held}) == 1


def test_seq_len_must_split_into_two_chunks_per_rank():
    with pytest.raises(ConfigError) as info:
        parse_args(["--parallelism.context_parallel_degree", "4", "--training.seq_len", "36"])
    assert info.value.problems == [
        "--training.seq_len (36) must be divisible by 2 x --parallelism.context_parallel_degree (4) = 8: each "
        "context-parallel rank holds 2 of 8 equal chunks of a sequence"]
    assert parse_args(["--parallelism.context_parallel_degree", "4", "--training.seq_len", "40"])


def test_attention_method_is_checked_with_the_other_problems():
    with pytest.raises(ConfigError) as info:
        parse_args(["--parallelism.context_parallel_attention", "ulysses", "--parallelism.context_parallel_degree",
                    "0"])
    assert len(info.value.problems) == 2
    assert "--parallelism.context_parallel_attention must be auto, allgather or ring (got 'ulysses')" in str(info.value)
    assert "--parallelism.context_parallel_degree must be >= 1 (got 0)" in str(info.value)


def test_context_parallel_degree_must_fit_the_world_size():
    with pytest.raises(ConfigError) as info:
        ParallelDims(dp_replicate=1, dp_shard=-1, tp=2, pp=1, cp=3, world_size=8)
    assert "world size 8 (NGPU x nodes) is not divisible by --parallelism.tensor_parallel_degree (2) x " \
           "--parallelism.context_parallel_degree (3) = 6" in str(info.value)
    with pytest.raises(ConfigError, match=r"--parallelism.data_parallel_shard_degree \(2\) x "
                                          r"--parallelism.context_parallel_degree \(2\) = 4, but the world size is 2"):
        ParallelDims(dp_replicate=1, dp_shard=2, tp=1, pp=1, cp=2, world_size=2)
    # Parameters are sharded over dp_shard x cp; expert parallelism may borrow the cp ranks.
    dims = ParallelDims(dp_replicate=1, dp_shard=-1, tp=1, pp=1, cp=2, ep=4, world_size=4)
    assert (dims.dp_shard, dims.fsdp_enabled, dims.dp_cp_degree, dims.efsdp) == (2, True, 4, 1)
    assert dims.degrees == {"world_size": 4, "dp_replicate": 1, "dp_shard": 2, "tp": 1, "pp": 1, "cp": 2, "ep": 4}


def _parallelize_problems(*flags: str, world_size: int) -> list[str]:
    job = parse_args(["--module", "llama3", "--config", "llama3_debugmodel", *flags])
    with torch.device("meta"):
        model = Transformer(TransformerModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=4, vocab_size=256))
    with pytest.raises(ConfigError) as info:
        parallelize_llama(model, ParallelDims.from_config(job.parallelism, world_size), job, "cpu")
    return info.value.problems


def test_ring_attention_is_refused_off_cuda_and_tp_must_split_each_ranks_share():
    problems = _parallelize_problems("--parallelism.context_parallel_degree", "2",
                                     "--parallelism.tensor_parallel_degree", "4", "--training.seq_len", "36",
                                     "--parallelism.context_parallel_attention", "ring", world_size=8)
    assert problems == [
        "--parallelism.tensor_parallel_degree (4) must divide --training.seq_len (36) / "
        "--parallelism.context_parallel_degree (2): sequence parallelism splits each rank's tokens across the "
        "tensor-parallel ranks",
        "--parallelism.context_parallel_attention ring runs on CUDA only (torch's ring attention needs CUDA's "
        "attention kernels); this run is on cpu: use allgather or auto"]
