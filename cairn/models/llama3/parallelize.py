"""Llama 3 parallelism: tensor and context parallel, activation checkpointing, compile, FSDP2/HSDP,
pipeline.

Everything here works on a model still on the meta device and keeps parameter FQNs
canonical (``layers.0.attention.wq.weight``) under every layout: FSDP2 and TP replace
parameters in place, activation checkpointing is a flag on ``TransformerBlock`` (not
``checkpoint_wrapper``), compile is ``module.compile()`` (not ``torch.compile(module)``),
and a pipeline stage is the whole model with the layers it does not own deleted.

The trainer's order of calls::

    with torch.device("meta"):
        model = Transformer(model_args)
    if parallel_dims.pp_enabled:
        pipeline = pipeline_llama(model, parallel_dims, job_config, device, loss_fn)
        model_parts = pipeline.model_parts      # parallelize_llama already applied to each
    else:
        model_parts = [parallelize_llama(model, parallel_dims, job_config, device)]
    for part in model_parts:
        part.to_empty(device=device)
        init_weights(part, job_config.debug.seed, device)   # or load a checkpoint
    # each micro-step with PP: loss = pipeline.step(inputs, labels), the batch's mean loss on
    # ranks of the last stage and None elsewhere; gradients accumulate over calls.
"""

from __future__ import annotations

import torch

from cairn.config.manager import ConfigError
from cairn.distributed.context_parallel import context_parallel_problems
from cairn.distributed.parallelize import (apply_activation_checkpointing, apply_compile, apply_context_parallel,
                                           apply_fsdp, apply_root_tensor_parallel, block_tensor_parallel_plan,
                                           data_parallel_mesh, mixed_precision_policy, pipeline_model,
                                           sequence_split_problems)
from cairn.distributed.pipeline import PipelineParts
from cairn.models.llama3.model import Transformer


def parallelize_llama(model: Transformer, parallel_dims, job_config, device: torch.device | str) -> Transformer:
    """Apply TP, CP, activation checkpointing, compile and FSDP2/HSDP (over dp_shard x cp), in that
    order, to a meta model or pipeline stage; returns the same module (parameters are replaced in place)."""
    device = torch.device(device)
    problems = model_problems(model, parallel_dims, job_config) + context_parallel_problems(
        parallel_dims, job_config, device.type)
    if problems:
        raise ConfigError(problems)
    if parallel_dims.tp_enabled:
        apply_tensor_parallel(model, parallel_dims.mesh["tp"])
    if parallel_dims.cp_enabled:
        apply_context_parallel(model, parallel_dims, job_config, device)
    if job_config.activation_checkpoint.mode == "full":
        apply_activation_checkpointing(model)
    if job_config.compile.enable:
        apply_compile(model)
    dp_mesh = data_parallel_mesh(parallel_dims)
    if dp_mesh is not None:
        # Under PP each microbatch runs the forward again: keep the gathered parameters
        # for the whole step instead of gathering them once per microbatch.
        apply_fsdp(model, dp_mesh, mixed_precision_policy(job_config, device),
                   reshard_after_forward=not parallel_dims.pp_enabled)
    return model


def model_problems(model: Transformer, parallel_dims, job_config) -> list[str]:
    """What this layout cannot do with this model, each naming its flag."""
    out = tensor_parallel_problems(model, parallel_dims, job_config)
    if parallel_dims.ep > 1:
        out.append(f"--parallelism.expert_parallel_degree ({parallel_dims.ep}) needs a mixture-of-experts model; "
                   f"llama3 has no experts: use 1 (or --module qwen3 --config qwen3_moe_debugmodel)")
    return out


def tensor_parallel_problems(model: Transformer, parallel_dims, job_config) -> list[str]:
    tp = parallel_dims.tp
    if tp == 1:
        return []
    args, flag = model.args, f"--parallelism.tensor_parallel_degree ({tp})"
    out = []
    if args.n_heads % tp or args.num_kv_heads % tp:
        out.append(f"{flag} must divide the model's n_heads ({args.n_heads}) and n_kv_heads "
                   f"({args.num_kv_heads}): each rank holds whole attention heads")
    if args.ffn_hidden_dim % tp:
        out.append(f"{flag} must divide the model's feed-forward hidden size ({args.ffn_hidden_dim})")
    return out + sequence_split_problems(parallel_dims, job_config)


def apply_tensor_parallel(model: Transformer, tp_mesh) -> None:
    """Megatron-style TP with sequence parallelism.

    Between blocks, activations are plain local tensors holding this rank's slice of the
    sequence (dim 1): norms run on that slice, attention and the MLP gather the whole
    sequence, shard heads / hidden units column-wise and reduce-scatter back to a sequence
    slice after wo / w2. The embedding is vocab-sharded; the output projection is
    vocab-sharded too and its logits are gathered, so any loss function works unchanged.
    Pipeline stages ship sequence slices between them.
    """
    from torch.distributed.tensor.parallel import parallelize_module

    apply_root_tensor_parallel(model, tp_mesh)
    block_plan = block_tensor_parallel_plan()
    for block in model.layers.values():
        parallelize_module(block, tp_mesh, block_plan)


def pipeline_llama(model: Transformer, parallel_dims, job_config, device: torch.device | str,
                   loss_fn) -> PipelineParts:
    """This rank's pipeline stages of a meta Llama, each parallelized, and their schedule
    (``cairn.distributed.parallelize.pipeline_model``). Run a step with ``PipelineParts.step``."""
    return pipeline_model(model, parallel_dims, job_config, device, loss_fn, parallelize=parallelize_llama,
                          model_problems=model_problems)
