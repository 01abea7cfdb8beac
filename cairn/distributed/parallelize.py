"""Parallelism every cairn model applies the same way: FSDP2/HSDP, activation checkpointing,
compile, and cutting a model into pipeline stages.

A model here is a decoder whose blocks sit in ``model.layers`` (a ``ModuleDict`` keyed by the
global layer index, each block with an ``activation_checkpoint`` flag), with ``tok_embeddings``,
``norm`` and ``output`` at the top and ``args.tie_word_embeddings``. Everything keeps parameter
FQNs canonical under every layout: FSDP2 replaces parameters in place, activation checkpointing
is a flag (not ``checkpoint_wrapper``), compile is ``module.compile()`` (not
``torch.compile(module)``), and a pipeline stage is the whole model with the layers it does not
own deleted. The model's own parallelize function adds tensor (and expert) parallelism.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from cairn.config.manager import ConfigError
from cairn.distributed.pipeline import (PipelineParts, build_schedule, num_microbatches, schedule_problems,
                                        split_layers, stage_ids_for_rank, stages_per_rank)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def apply_root_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """TP on a decoder's ends, with sequence parallelism between blocks: the embedding is
    vocab-sharded and hands each rank its slice of the sequence (dim 1), the final norm runs on
    that slice, and the output projection is vocab-sharded with its logits gathered, so any loss
    function works unchanged. Tied embeddings are re-tied (both sides shard the (vocab, dim)
    matrix on dim 0)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel, SequenceParallel,
                                                   parallelize_module)

    plan = {}
    if model.tok_embeddings is not None:
        plan["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if model.norm is not None:
        plan["norm"] = SequenceParallel()
    if model.output is not None:
        plan["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    if plan:
        parallelize_module(model, tp_mesh, plan)
    if model.args.tie_word_embeddings and model.tok_embeddings is not None and model.output is not None:
        model.output.weight = model.tok_embeddings.weight


def block_tensor_parallel_plan(feed_forward: bool = True) -> dict:
    """The TP plan of a decoder block (``attention.{wq,wk,wv,wo}``, ``feed_forward.{w1,w2,w3}``,
    ``{attention,ffn}_norm``), Megatron-style with sequence parallelism: norms run on the rank's
    sequence slice, attention and the feed-forward gather the whole sequence, shard heads /
    hidden units column-wise and reduce-scatter back to a sequence slice after ``wo`` / ``w2``.
    ``feed_forward=False`` leaves the feed-forward out (a block with a mixture of experts)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    plan = {
        "attention_norm": SequenceParallel(),
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                        desired_input_layouts=(Replicate(), None, None), use_local_output=True),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
        "ffn_norm": SequenceParallel(),
    }
    if feed_forward:
        plan.update({
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                               use_local_output=True),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
            "feed_forward.w3": ColwiseParallel(),
        })
    return plan


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass (``--activation_checkpoint.mode full``)."""
    for block in model.layers.values():
        block.activation_checkpoint = True


def apply_compile(model: nn.Module) -> None:
    """Compile each block in place: ``module.compile()`` keeps FQNs (``torch.compile(m)`` adds ``_orig_mod``)."""
    for block in model.layers.values():
        block.compile()


def data_parallel_mesh(parallel_dims):
    """FSDP over dp_shard x cp; HSDP (pure replication when both are 1) once dp_replicate > 1; None
    without either."""
    if parallel_dims.dp_replicate_enabled or parallel_dims.fsdp_enabled:
        return parallel_dims.fsdp_mesh
    return None


def sequence_split_problems(parallel_dims, job_config) -> list[str]:
    """Sequence parallelism (TP) splits each rank's part of a sequence (the whole of it, or its
    context-parallel share) across the tp ranks."""
    tp, cp, seq_len = parallel_dims.tp, parallel_dims.cp, job_config.training.seq_len
    if tp == 1 or (seq_len // cp) % tp == 0:
        return []
    share = f"--training.seq_len ({seq_len})" if cp == 1 else \
        f"--training.seq_len ({seq_len}) / --parallelism.context_parallel_degree ({cp})"
    return [f"--parallelism.tensor_parallel_degree ({tp}) must divide {share}: sequence parallelism splits "
            "each rank's tokens across the tensor-parallel ranks"]


def apply_context_parallel(model: nn.Module, parallel_dims, job_config, device: torch.device) -> None:
    """Give ``model``'s attention its CP group and cut its rotary tables to this rank's positions."""
    from cairn.distributed.context_parallel import build_context_parallel

    model.set_context_parallel(build_context_parallel(parallel_dims, job_config, device.type))


def mixed_precision_policy(job_config, device: torch.device):
    """bf16 (--training.mixed_precision_param) compute with fp32 reductions on GPUs; CPU stays fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=DTYPES[job_config.training.mixed_precision_param],
                                reduce_dtype=DTYPES[job_config.training.mixed_precision_reduce])


def apply_fsdp(model: nn.Module, dp_mesh, mp_policy, reshard_after_forward: bool) -> None:
    """fully_shard each block (one all-gather per block), then the root for embeddings, norm and output."""
    from torch.distributed.fsdp import fully_shard

    blocks = list(model.layers.values())
    for index, block in enumerate(blocks):
        # The backward starts with the last block: resharding it after the forward would
        # only gather it again at once.
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy,
                    reshard_after_forward=reshard_after_forward and index < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)


def pipeline_model(model: nn.Module, parallel_dims, job_config, device: torch.device | str, loss_fn,
                   parallelize: Callable, model_problems: Callable) -> PipelineParts:
    """Cut a meta model into this rank's pipeline stages, parallelize each, build the schedule.

    Stage ``s`` of ``pp x stages_per_rank`` holds a contiguous run of layers; stage 0 also
    ``tok_embeddings``, the last stage ``norm`` and ``output``. Each stage is a copy of the
    whole model with the rest deleted, so its FQNs are the whole model's. ``parallelize(stage,
    parallel_dims, job_config, device)`` is the model's own; ``model_problems(model,
    parallel_dims, job_config)`` its layout problems, reported together with the pipeline's.

    The returned ``model_parts`` are still on the meta device: ``PipelineStage`` infers
    activation shapes at the first ``step``, so nothing needs real memory before that. The
    trainer materializes them (``part.to_empty(device=device)`` then ``init_weights``, or a
    checkpoint load) before the first step.

    ``loss_fn(logits, labels)`` must be a mean over its (micro)batch; the schedule's losses
    are scaled so that the pipelined step matches one process on the same batch (see
    ``cairn.distributed.pipeline``).
    """
    device = torch.device(device)
    pp_degree = parallel_dims.pp
    schedule_name = job_config.parallelism.pipeline_parallel_schedule
    num_stages = pp_degree * stages_per_rank(schedule_name)
    problems = pipeline_problems(model, parallel_dims, job_config, num_stages)
    problems += model_problems(model, parallel_dims, job_config)
    n_microbatches = 0
    try:
        n_microbatches = num_microbatches(job_config.training.local_batch_size,
                                          job_config.parallelism.pipeline_parallel_microbatch_size)
        problems += schedule_problems(schedule_name, n_microbatches, pp_degree)
    except ValueError as e:
        problems.append(str(e))
    if problems:
        raise ConfigError(problems)

    from torch.distributed.pipelining import PipelineStage

    pp_mesh = parallel_dims.mesh["pp"]
    layer_splits = split_layers(list(model.layers.keys()), num_stages)
    stage_ids = stage_ids_for_rank(pp_mesh.get_local_rank(), pp_degree, stages_per_rank(schedule_name))
    parts, stages = [], []
    for stage_id in stage_ids:
        part = stage_module(model, layer_splits[stage_id], is_first=stage_id == 0,
                            is_last=stage_id == num_stages - 1)
        part = parallelize(part, parallel_dims, job_config, device)
        stages.append(PipelineStage(part, stage_id, num_stages, device, group=pp_mesh.get_group()))
        parts.append(part)
    schedule = build_schedule(stages, schedule_name, n_microbatches, loss_fn)
    return PipelineParts(schedule=schedule, model_parts=parts, has_first_stage=0 in stage_ids,
                         has_last_stage=num_stages - 1 in stage_ids, n_microbatches=n_microbatches,
                         stage_ids=tuple(stage_ids))


def pipeline_problems(model: nn.Module, parallel_dims, job_config, num_stages: int) -> list[str]:
    args, flag = model.args, f"--parallelism.pipeline_parallel_degree ({parallel_dims.pp})"
    out = []
    if args.tie_word_embeddings and num_stages > 1:
        out.append(f"{flag} > 1 cannot split a model with tie_word_embeddings (flavor "
                   f"{job_config.model.flavor!r}): the embedding and the output projection, one tensor, "
                   "would live on the first and the last stage")
    if len(model.layers) < num_stages:
        out.append(f"{flag} with --parallelism.pipeline_parallel_schedule "
                   f"{job_config.parallelism.pipeline_parallel_schedule} needs {num_stages} stages, but the "
                   f"model has only {len(model.layers)} layers")
    return out


def stage_module(model: nn.Module, layer_ids: list[str], is_first: bool, is_last: bool) -> nn.Module:
    stage = copy.deepcopy(model)  # cheap on the meta device
    for layer_id in list(stage.layers.keys()):
        if layer_id not in layer_ids:
            del stage.layers[layer_id]
    if not is_first:
        stage.tok_embeddings = None
    if not is_last:
        stage.norm = None
        stage.output = None
    return stage
