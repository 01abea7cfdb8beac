"""Qwen3 parallelism: tensor parallel on the dense parts, expert parallel on the routed experts,
activation checkpointing, compile, FSDP2/HSDP, pipeline (the model-agnostic parts are in
``cairn.distributed.parallelize``). FQNs stay canonical under every layout.

How the parts compose (``cairn.distributed.parallel_dims`` draws the meshes):

- TP (``mesh["tp"]``, sequence parallel between blocks): attention as for Llama 3, with the
  per-head q/k norms sharded along the head dim; the dense feed-forward column/row-wise.
- An MoE layer is not tensor-parallel: it works on the rank's own sequence slice. Its router is
  replicated over tp (its gradient summed over the slices); its experts are sharded over the EP
  group, whose ranks (taken from dp_shard x cp x tp) exchange their slices' tokens by all-to-all.
- CP: attention across the sequence shards (``cairn.distributed.context_parallel``); an MoE layer
  routes the rank's own tokens, and its EP group may include cp ranks (EP borrows dp_shard x cp x tp).
- FSDP: each block and the root over dp_shard x cp (with dp_replicate: HSDP); the experts of each
  layer first, as a unit of their own, over ``efsdp`` (the sparse mesh's ranks that hold the same
  experts), on dim 1 under EP (dim 0 is the expert dim EP already split). Their gradients are
  divided by dp x cp like every other parameter's (tokens reach an expert from every rank of its
  EP group, so the sum over efsdp alone would over-count).
"""

from __future__ import annotations

import torch

from cairn.config.manager import ConfigError
from cairn.distributed.expert_parallel import apply_expert_parallel
from cairn.distributed.context_parallel import context_parallel_problems
from cairn.distributed.parallelize import (apply_activation_checkpointing, apply_compile, apply_context_parallel,
                                           apply_fsdp, apply_root_tensor_parallel, block_tensor_parallel_plan,
                                           data_parallel_mesh, mixed_precision_policy, pipeline_model,
                                           sequence_split_problems)
from cairn.distributed.pipeline import PipelineParts
from cairn.models.qwen3.model import Transformer


def parallelize_qwen3(model: Transformer, parallel_dims, job_config, device: torch.device | str) -> Transformer:
    """Apply TP, CP, EP, activation checkpointing, compile and FSDP2/HSDP (over dp_shard x cp), in
    that order, to a meta model or pipeline stage; returns the same module (parameters are replaced
    in place)."""
    device = torch.device(device)
    problems = model_problems(model, parallel_dims, job_config) + context_parallel_problems(
        parallel_dims, job_config, device.type)
    if problems:
        raise ConfigError(problems)
    if parallel_dims.tp_enabled:
        apply_tensor_parallel(model, parallel_dims.mesh["tp"])
    if parallel_dims.cp_enabled:
        apply_context_parallel(model, parallel_dims, job_config, device)
    stage_group = parallel_dims.stage_mesh.get_group() if parallel_dims.stage_mesh.size() > 1 else None
    for block in model.layers.values():
        if block.moe is not None:
            block.moe.balance_group = stage_group
            if parallel_dims.ep_enabled:
                apply_expert_parallel(block.moe.experts, parallel_dims.sparse_mesh["ep"])
    if job_config.activation_checkpoint.mode == "full":
        apply_activation_checkpointing(model)
    if job_config.compile.enable:
        apply_compile(model)
    dp_mesh = data_parallel_mesh(parallel_dims)
    mp_policy = mixed_precision_policy(job_config, device)
    # Under PP each microbatch runs the forward again: keep the gathered parameters for the step.
    reshard = not parallel_dims.pp_enabled
    if model.args.moe is not None and (parallel_dims.efsdp > 1 or parallel_dims.ep_enabled
                                       or parallel_dims.dp_replicate_enabled):
        apply_experts_fsdp(model, parallel_dims, mp_policy, reshard)
    if dp_mesh is not None:
        apply_fsdp(model, dp_mesh, mp_policy, reshard_after_forward=reshard)
    return model


def model_problems(model: Transformer, parallel_dims, job_config) -> list[str]:
    """What this layout cannot do with this model, each naming its flag."""
    args, out = model.args, []
    tp, ep = parallel_dims.tp, parallel_dims.ep
    flavor = f"--model.flavor {job_config.model.flavor}"
    if tp > 1:
        flag = f"--parallelism.tensor_parallel_degree ({tp})"
        if args.n_heads % tp or args.num_kv_heads % tp:
            out.append(f"{flag} must divide the model's n_heads ({args.n_heads}) and n_kv_heads "
                       f"({args.num_kv_heads}): each rank holds whole attention heads")
        if args.moe is None and args.hidden_dim % tp:
            out.append(f"{flag} must divide the model's feed-forward hidden size ({args.hidden_dim})")
        out += sequence_split_problems(parallel_dims, job_config)
    if ep > 1:
        flag = f"--parallelism.expert_parallel_degree ({ep})"
        if args.moe is None:
            out.append(f"{flag} needs a mixture-of-experts model; {flavor} is dense: use 1 "
                       "(or a MoE flavor: moe_debugmodel, 30B-A3B, 235B-A22B)")
        elif args.moe.num_experts % ep:
            out.append(f"{flag} must divide the number of experts of {flavor} ({args.moe.num_experts}): "
                       "each rank holds the same number of whole experts")
    return out


def apply_tensor_parallel(model: Transformer, tp_mesh) -> None:
    """Megatron-style TP with sequence parallelism on attention and dense feed-forwards (see Llama 3's)."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import PrepareModuleInput, SequenceParallel, parallelize_module

    apply_root_tensor_parallel(model, tp_mesh)
    for block in model.layers.values():
        plan = block_tensor_parallel_plan(feed_forward=block.moe is None)
        # (batch, seq, heads, head_dim): each rank normalizes its own heads with the shared weight.
        plan["attention.q_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        plan["attention.k_norm"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        if block.moe is not None:
            # The MoE takes its rank's sequence slice as it is; the router sees those tokens flattened
            # to (tokens, dim): replicated weight, tokens sharded on dim 0, so its gradient is summed
            # over the tensor-parallel ranks.
            plan["moe"] = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Shard(1),),
                                             use_local_output=True)
            plan["moe.router.gate"] = SequenceParallel(sequence_dim=0, use_local_output=True)
        parallelize_module(block, tp_mesh, plan)


def apply_experts_fsdp(model: Transformer, parallel_dims, mp_policy, reshard_after_forward: bool) -> None:
    """fully_shard each layer's routed experts over the sparse mesh's efsdp (with dp_replicate: HSDP)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    sparse = parallel_dims.sparse_mesh
    mesh = sparse["dp_replicate", "efsdp"] if parallel_dims.dp_replicate_enabled else sparse["efsdp"]
    shard_dim = 1 if parallel_dims.ep_enabled else 0
    for block in model.layers.values():
        if block.moe is None:
            continue
        fully_shard(block.moe.experts, mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward,
                    shard_placement_fn=lambda param: Shard(shard_dim))
        block.moe.experts.set_gradient_divide_factor(parallel_dims.dp_cp_degree)
        if parallel_dims.efsdp > 1:
            # A plain sum, then the division: gloo has no pre-multiplied sum. (Not when the shard
            # group is one rank: torch 2.13's FSDP then divides twice.)
            block.moe.experts.set_force_sum_reduction_for_comms(True)


def pipeline_qwen3(model: Transformer, parallel_dims, job_config, device: torch.device | str,
                   loss_fn) -> PipelineParts:
    """This rank's pipeline stages of a meta Qwen3, each parallelized, and their schedule
    (``cairn.distributed.parallelize.pipeline_model``)."""
    return pipeline_model(model, parallel_dims, job_config, device, loss_fn, parallelize=parallelize_qwen3,
                          model_problems=model_problems)
