"""Every parallel layout trains like one process: same first loss, gradients and updated weights.

Each rank also runs the whole model on the whole global batch in-process (a few ms for this
tiny model) and compares its own shards against it, so no results travel between processes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _launch import run_distributed  # noqa: E402

from cairn.config.job_config import JobConfig  # noqa: E402
from cairn.config.manager import ConfigError  # noqa: E402
from cairn.distributed.context_parallel import build_context_parallel  # noqa: E402
from cairn.distributed.parallel_dims import ParallelDims  # noqa: E402
from cairn.models.llama3.model import Transformer, TransformerModelArgs, init_weights  # noqa: E402
from cairn.models.llama3.parallelize import parallelize_llama, pipeline_llama  # noqa: E402

SEED = 7
SEQ_LEN = 32
GLOBAL_BATCH = 8
LR = 1e-3
EPS = 1e-8


def tiny_args(**overrides) -> TransformerModelArgs:
    args = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=SEQ_LEN)
    return TransformerModelArgs(**{**args, **overrides})


def job_config(dp_replicate=1, dp_shard=1, tp=1, pp=1, cp=1, schedule="1F1B", ac=False, compile=False,
               grad_accum_steps=1) -> JobConfig:
    job = JobConfig()
    par = job.parallelism
    par.data_parallel_replicate_degree, par.data_parallel_shard_degree = dp_replicate, dp_shard
    par.tensor_parallel_degree, par.pipeline_parallel_degree = tp, pp
    par.context_parallel_degree = cp
    par.pipeline_parallel_schedule, par.pipeline_parallel_microbatch_size = schedule, 1
    job.training.seq_len = SEQ_LEN
    job.training.local_batch_size = GLOBAL_BATCH // (dp_replicate * dp_shard * grad_accum_steps)
    job.activation_checkpoint.mode = "full" if ac else "none"
    job.compile.enable = compile
    job.debug.seed = SEED
    return job


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def global_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, vocab_size, (GLOBAL_BATCH, SEQ_LEN + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def make_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), eps=EPS, weight_decay=0.1, foreach=False)


def reference_step(args: TransformerModelArgs) -> dict:
    """One process, whole model, whole global batch: what every layout must reproduce."""
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    init_weights(model, SEED, "cpu")
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    tokens, labels = global_batch(args.vocab_size)
    loss = loss_fn(model(tokens), labels)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    make_optimizer(model.parameters()).step()
    return {"loss": loss.detach(), "initial": initial, "grads": grads,
            "updated": {name: p.detach().clone() for name, p in model.named_parameters()},
            "keys": set(model.state_dict().keys())}


def full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def build_parts(args, parallel_dims, job, pipeline_loss_fn):
    with torch.device("meta"):
        model = Transformer(args)
    device = torch.device("cpu")
    pipeline = None
    if parallel_dims.pp_enabled:
        pipeline = pipeline_llama(model, parallel_dims, job, device, pipeline_loss_fn)
        parts = pipeline.model_parts
    else:
        parts = [parallelize_llama(model, parallel_dims, job, device)]
    for part in parts:
        part.to_empty(device=device)
        init_weights(part, SEED, device)
    return parts, pipeline


def named_params(parts) -> dict[str, torch.Tensor]:
    return {name: p for part in parts for name, p in part.named_parameters()}


def check_layout(rank: int, world_size: int, degrees: dict, ac: bool, grad_accum_steps: int = 1,
                 model_overrides: dict | None = None) -> float:
    args = tiny_args(**(model_overrides or {}))
    job = job_config(**degrees, ac=ac, grad_accum_steps=grad_accum_steps)
    parallel_dims = ParallelDims.from_config(job.parallelism, world_size)
    mesh = parallel_dims.build_mesh("cpu")
    ref = reference_step(args)

    def accumulated_loss_fn(logits, labels):  # what a trainer with gradient accumulation passes
        return loss_fn(logits, labels) / grad_accum_steps

    parts, pipeline = build_parts(args, parallel_dims, job, accumulated_loss_fn)

    # Canonical keys: each part's keys are the whole model's; together the stages cover them all.
    keys = set().union(*(part.state_dict().keys() for part in parts))
    assert keys <= ref["keys"], sorted(keys - ref["keys"])
    all_keys = [None] * world_size
    dist.all_gather_object(all_keys, sorted(keys))
    assert set().union(*map(set, all_keys)) == ref["keys"]

    params = named_params(parts)
    for name, param in params.items():
        torch.testing.assert_close(full(param.detach()), ref["initial"][name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")

    tokens, labels = global_batch(args.vocab_size)
    rank_batch = GLOBAL_BATCH // parallel_dims.dp_degree
    dp_rank = mesh["dp"].get_local_rank()
    tokens = tokens[dp_rank * rank_batch:(dp_rank + 1) * rank_batch]
    labels = labels[dp_rank * rank_batch:(dp_rank + 1) * rank_batch]
    context_parallel = build_context_parallel(parallel_dims, job, "cpu")
    if context_parallel is not None:  # the cp ranks of a dp rank share its sequences, each its own tokens
        tokens, labels = context_parallel.shard(tokens), context_parallel.shard(labels)
    loss = torch.zeros(())
    for micro_tokens, micro_labels in zip(tokens.chunk(grad_accum_steps), labels.chunk(grad_accum_steps)):
        if pipeline is not None:
            micro_loss = pipeline.step(micro_tokens, micro_labels)
            loss = None if micro_loss is None else loss + micro_loss
        else:
            micro_loss = accumulated_loss_fn(parts[0](micro_tokens), micro_labels)
            micro_loss.backward()
            loss += micro_loss.detach()
    if loss is not None:  # ranks of the last pipeline stage (all ranks without PP)
        dist.all_reduce(loss, group=mesh["dp"].get_group())
        dist.all_reduce(loss, group=parallel_dims.cp_mesh.get_group())
        loss /= parallel_dims.dp_cp_degree
        torch.testing.assert_close(loss, ref["loss"], rtol=1e-5, atol=0)

    for name, param in params.items():
        torch.testing.assert_close(full(param.grad), ref["grads"][name], rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    grads = {name: full(param.grad) for name, param in params.items()}
    make_optimizer(list(params.values())).step()
    # Adam's first update of an element is lr * g / (|g| + eps) (plus the decay): for |g| near
    # eps the summation-order difference of the gradients, bounded above, moves it by up to lr.
    # Each element may differ by what that difference explains plus a small fraction of lr.
    for name, param in params.items():
        mine, theirs = grads[name], ref["grads"][name]
        explained = LR * (mine / (mine.abs() + EPS) - theirs / (theirs.abs() + EPS)).abs()
        difference = (full(param.detach()) - ref["updated"][name]).abs()
        allowed = LR * 1e-2 + explained + 1e-4 * ref["updated"][name].abs()
        worst = int(torch.argmax(difference - allowed))
        assert bool((difference <= allowed).all()), (
            f"{name}: update differs by {difference.flatten()[worst].item():.3g} at flat index {worst}, "
            f"allowed {allowed.flatten()[worst].item():.3g}")
    return None if loss is None else loss.item()


LAYOUTS = {
    "fsdp4": (4, dict(dp_shard=4), False),
    "hsdp2x2_ac": (4, dict(dp_replicate=2, dp_shard=2), True),
    "replicate2": (2, dict(dp_replicate=2), False),
    "fsdp2_tp2": (4, dict(dp_shard=2, tp=2), False),
    "pp2_fsdp2": (4, dict(pp=2, dp_shard=2), False),
    "pp2_gpipe": (2, dict(pp=2, schedule="GPipe"), False),
    "pp2_interleaved_tp2_ac": (4, dict(pp=2, tp=2, schedule="Interleaved1F1B"), True),
}


@pytest.mark.distributed
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout):
    world_size, degrees, ac = LAYOUTS[layout]
    losses = run_distributed(check_layout, world_size, degrees, ac)
    assert any(loss is not None for loss in losses)


@pytest.mark.distributed
def test_tied_embeddings_under_fsdp_and_tp_match_single_process():
    # Llama 3.2 1B/3B tie the embedding and the output projection: TP must keep them one tensor.
    losses = run_distributed(check_layout, 4, dict(dp_shard=2, tp=2), False, 1, dict(tie_word_embeddings=True))
    assert any(loss is not None for loss in losses)


@pytest.mark.distributed
def test_pipeline_with_gradient_accumulation_matches_single_process():
    # Two schedule steps per optimizer step: gradients must add up, not be rescaled twice.
    losses = run_distributed(check_layout, 2, dict(pp=2), False, 2)
    assert any(loss is not None for loss in losses)


def test_to_empty_keeps_tied_embeddings_tied():
    with torch.device("meta"):
        model = Transformer(tiny_args(tie_word_embeddings=True))
    model.to_empty(device="cpu")
    assert model.output.weight is model.tok_embeddings.weight


def test_fqns_stay_canonical_with_activation_checkpointing_and_compile():
    args = tiny_args()
    with torch.device("meta"):
        reference = Transformer(args)
        model = Transformer(args)
    job = job_config(ac=True, compile=True)
    parallelize_llama(model, ParallelDims.from_config(job.parallelism, 1), job, "cpu")
    assert all(block.activation_checkpoint for block in model.layers.values())
    assert list(model.state_dict().keys()) == list(reference.state_dict().keys())
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]


def test_activation_checkpointing_gives_the_same_gradients():
    args = tiny_args()
    tokens, labels = global_batch(args.vocab_size)
    grads = []
    for ac in (False, True):
        with torch.device("meta"):
            model = Transformer(args)
        job = job_config(ac=ac)
        parallelize_llama(model, ParallelDims.from_config(job.parallelism, 1), job, "cpu")
        model.to_empty(device="cpu")
        init_weights(model, SEED, "cpu")
        loss_fn(model(tokens), labels).backward()
        grads.append({name: p.grad for name, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_tensor_parallel_degree_must_divide_heads():
    with torch.device("meta"):
        model = Transformer(tiny_args(n_heads=4, n_kv_heads=2))
    job = job_config(tp=4)
    with pytest.raises(ConfigError, match=r"--parallelism.tensor_parallel_degree \(4\).*n_heads \(4\).*n_kv_heads \(2\)"):
        parallelize_llama(model, ParallelDims.from_config(job.parallelism, 4), job, "cpu")


def test_pipeline_needs_a_layer_per_stage():
    with torch.device("meta"):
        model = Transformer(tiny_args(n_layers=4))
    job = job_config(pp=4, schedule="Interleaved1F1B")
    job.training.local_batch_size = 8
    with pytest.raises(ConfigError, match=r"--parallelism.pipeline_parallel_degree \(4\).*8 stages.*only 4 layers"):
        pipeline_llama(model, ParallelDims.from_config(job.parallelism, 4), job, "cpu", loss_fn)


def test_pipeline_refuses_tied_embeddings_and_bad_microbatches():
    with torch.device("meta"):
        model = Transformer(tiny_args(tie_word_embeddings=True))
    job = job_config(pp=2)
    job.training.local_batch_size = 3
    job.parallelism.pipeline_parallel_microbatch_size = 2
    with pytest.raises(ConfigError) as error:
        pipeline_llama(model, ParallelDims.from_config(job.parallelism, 2), job, "cpu", loss_fn)
    message = str(error.value)
    assert "tie_word_embeddings" in message
    assert "--training.local_batch_size (3)" in message and "pipeline_parallel_microbatch_size (2)" in message
