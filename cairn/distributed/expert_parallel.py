"""Expert parallelism: routed experts split over the ``ep`` ranks, tokens sent to them by all-to-all.

A mixture-of-experts layer holds its routed experts as grouped 3-D parameters
(``[experts, ...]``). ``apply_expert_parallel`` turns each into a DTensor sharded on dim 0 over
the EP mesh, so rank ``r`` of an EP group of ``ep`` ranks holds experts ``[r E/ep, (r+1) E/ep)``
and a checkpoint stores (and reshards) every expert under its global index.

One forward of the layer on each rank (``dispatch`` then ``combine``):

1. the rank's routed tokens, sorted by global expert id, with the count per expert;
2. per-expert counts are exchanged (one small all-to-all), so each rank knows how many rows it
   will receive from each peer for each of its experts;
3. the rows travel to the ranks that own their experts (all-to-all with uneven splits), arriving
   grouped by source rank, and are regrouped by local expert;
4. the experts run; their outputs take the same way back in reverse.

Both all-to-alls carry gradients (the backward of one is the other), and only
``torch.distributed.all_to_all_single`` is used, which gloo (CPU) and NCCL both implement.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` whose backward sends the gradients back the way the rows came."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        out = rows.new_empty((sum(output_splits), *rows.shape[1:]))
        dist.all_to_all_single(out, rows.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((sum(ctx.input_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.input_splits, ctx.output_splits, group=ctx.group)
        return out, None, None, None


def all_to_all(rows: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Rows ``input_splits[r]`` at a time to rank ``r``; ``output_splits[r]`` rows arrive from rank ``r``."""
    return _AllToAll.apply(rows, output_splits, input_splits, group)


@dataclass
class Dispatched:
    """What ``combine`` needs to send a dispatch's expert outputs back."""

    order: torch.Tensor  # received row -> position when grouped by local expert
    send_splits: list[int]
    recv_splits: list[int]
    group: object


def dispatch(rows: torch.Tensor, counts: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor, Dispatched]:
    """Send routed rows to the ranks that own their experts.

    ``rows``: (N, dim), sorted by global expert id; ``counts``: (E,) rows per global expert.
    Returns (rows grouped by local expert, rows per local expert, what ``combine`` needs).
    """
    ep = dist.get_world_size(group)
    num_local = counts.numel() // ep
    counts = counts.to(torch.int64)
    # recv_counts[s, j]: rows rank s sends for this rank's local expert j.
    recv_counts = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts, counts, group=group)
    recv_counts = recv_counts.view(ep, num_local)
    send_splits = counts.view(ep, num_local).sum(1).tolist()
    recv_splits = recv_counts.sum(1).tolist()
    received = all_to_all(rows, recv_splits, send_splits, group)
    # Arrived grouped by source rank, then local expert: regroup by local expert (sources in rank order).
    expert_of_row = torch.arange(num_local, device=rows.device).repeat(ep).repeat_interleave(
        recv_counts.flatten().to(rows.device))
    order = torch.argsort(expert_of_row, stable=True)
    return received[order], recv_counts.sum(0), Dispatched(order, send_splits, recv_splits, group)


def combine(outputs: torch.Tensor, dispatched: Dispatched) -> torch.Tensor:
    """The experts' outputs (grouped by local expert) back to the ranks and rows they came from."""
    inverse = torch.empty_like(dispatched.order)
    inverse[dispatched.order] = torch.arange(dispatched.order.numel(), device=dispatched.order.device)
    by_source = outputs[inverse]
    return all_to_all(by_source, dispatched.send_splits, dispatched.recv_splits, dispatched.group)


def apply_expert_parallel(experts: nn.Module, ep_mesh) -> None:
    """Shard every (grouped, 3-D) parameter of ``experts`` on dim 0 over ``ep_mesh``, and give the
    module the group its forward dispatches over (``experts.ep_group``). Works on the meta device."""
    from torch.distributed.tensor import Shard, distribute_tensor

    for name, param in list(experts.named_parameters(recurse=False)):
        sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)], src_data_rank=None)
        experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
    experts.ep_group = ep_mesh.get_group()
