"""A mixture-of-experts feed-forward: top-k router, grouped experts, load balancing.

State and its names (what a checkpoint holds for one MoE layer ``layers.<i>.moe``):

- ``router.gate.weight`` (E, dim): the router; a token goes to the ``top_k`` experts of highest
  softmax probability; its output is the probability-weighted sum of theirs (probabilities
  renormalized over the chosen ``top_k`` when ``norm_topk_prob``), as Qwen3-MoE does.
- ``experts.w1`` / ``experts.w3`` (E, hidden, dim) and ``experts.w2`` (E, dim, hidden): every
  expert's SwiGLU as one grouped 3-D parameter; ``w1[e]`` is expert e's gate projection. Under
  expert parallelism they are DTensors sharded on dim 0 (``cairn.distributed.expert_parallel``).
- ``expert_bias`` (E,), only with ``load_balance_coeff``: DeepSeek-V3's auxiliary-loss-free
  balancing. It is added to the probabilities when choosing experts (never to the weights), and
  after each optimizer step moves every expert's bias by ``load_balance_coeff`` towards the
  mean load (``update_expert_bias``). Training state, not a parameter: it is a persistent
  buffer, so every checkpoint holds it, and identical on every rank (updated from counts summed
  over all ranks of the pipeline stage).

The load-balancing loss (Switch Transformer's, as Qwen3-MoE trains with: ``E * sum_e f_e P_e``,
``f_e`` the fraction of routed slots of expert e in the whole batch, over every data-parallel
rank, and ``P_e`` its mean probability) is added to
the gradients, not to the reported loss: ``aux_loss_coeff x loss`` enters the backward at the
layer's output (``_AuxLossGrad``), which needs no plumbing through pipeline stages. Its weight is
``aux_loss_coeff x tokens here / tokens of one data-parallel rank per optimizer step`` (under
context parallelism, the rank's share of them), so micro-batches, pipeline micro-batches and
sequence-parallel slices add up to one loss per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cairn.distributed.expert_parallel import combine, dispatch


@dataclass(kw_only=True)
class MoEArgs:
    num_experts: int = 8
    top_k: int = 2
    hidden_dim: int = 768
    """Each expert's SwiGLU hidden size (HF: moe_intermediate_size)."""
    norm_topk_prob: bool = True
    """Renormalize the chosen experts' probabilities to sum to 1."""
    aux_loss_coeff: float = 0.001
    """Weight of the load-balancing loss (HF: router_aux_loss_coef); 0 turns it off."""
    load_balance_coeff: float | None = None
    """DeepSeek-V3 auxiliary-loss-free balancing: the per-expert bias update rate; None: no bias."""

    def problems(self) -> list[str]:
        out = []
        if not 1 <= self.top_k <= self.num_experts:
            out.append(f"moe top_k {self.top_k} must be in [1, num_experts {self.num_experts}]")
        if self.hidden_dim < 1:
            out.append(f"moe hidden_dim must be >= 1 (got {self.hidden_dim})")
        return out


class _AuxLossGrad(torch.autograd.Function):
    """Identity on ``out``; in the backward, ``loss`` receives gradient 1 (it was scaled before)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones((), dtype=torch.float32, device=grad.device)


class Router(nn.Module):
    def __init__(self, dim: int, num_experts: int):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)


class GroupedExperts(nn.Module):
    """E SwiGLU experts as three 3-D parameters; runs each (local) expert on its rows."""

    def __init__(self, dim: int, hidden_dim: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.ep_group = None  # set by apply_expert_parallel

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``rows`` grouped by (local) expert, ``counts[e]`` of them for expert e."""
        w1, w2, w3 = (_local(w) for w in (self.w1, self.w2, self.w3))
        outputs = []
        # Every expert runs, an empty one on zero rows: each rank's backward then produces a
        # gradient for every expert, and FSDP's reduction finds the same tensors on every rank.
        for e, chunk in enumerate(rows.split(counts.tolist())):
            hidden = F.silu(chunk @ w1[e].transpose(0, 1)) * (chunk @ w3[e].transpose(0, 1))
            outputs.append(hidden @ w2[e].transpose(0, 1))
        return torch.cat(outputs)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class MoE(nn.Module):
    def __init__(self, dim: int, args: MoEArgs):
        super().__init__()
        self.args = args
        self.router = Router(dim, args.num_experts)
        self.experts = GroupedExperts(dim, args.hidden_dim, args.num_experts)
        if args.load_balance_coeff is not None:
            self.register_buffer("expert_bias", torch.zeros(args.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        # Routed slots per expert since the last optimizer step (this rank's tokens).
        self.register_buffer("tokens_per_expert", torch.zeros(args.num_experts, dtype=torch.float32),
                             persistent=False)
        self.tokens_per_step: int | None = None  # one dp (x cp) rank's tokens per optimizer step
        self.balance_group = None  # the pipeline stage's ranks: their counts make the batch's expert loads
        self.last_aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, seq, dim), this rank's tokens (a sequence slice under tensor parallelism)."""
        batch, seq, dim = x.shape
        num_experts, top_k = self.args.num_experts, self.args.top_k
        tokens = x.reshape(batch * seq, dim)
        logits = self.router.gate(tokens)
        probs = F.softmax(logits.float(), dim=-1)
        choice = probs if self.expert_bias is None else probs + self.expert_bias
        chosen = torch.topk(choice, top_k, dim=-1).indices  # (tokens, top_k)
        weights = probs.gather(1, chosen)
        if self.args.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        # A comparison, not bincount: CUDA's bincount refuses --debug.deterministic.
        counts = (chosen.flatten().unsqueeze(1) == torch.arange(num_experts, device=chosen.device)).sum(dim=0)
        if self.training:
            with torch.no_grad():
                # Under full activation checkpointing the recompute counts again: every layer's
                # counts double, which leaves the bias update (a sign) unchanged.
                self.tokens_per_expert += counts.float()

        # Routed slots sorted by expert; each slot is a copy of its token's row.
        order = torch.argsort(chosen.flatten(), stable=True)
        rows = tokens[order // top_k]
        if self.experts.ep_group is not None:
            local_rows, local_counts, dispatched = dispatch(rows, counts, self.experts.ep_group)
            routed = combine(self.experts(local_rows, local_counts), dispatched)
        else:
            routed = self.experts(rows, counts)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        slots = routed[inverse].view(batch * seq, top_k, dim)
        out = (slots * weights.unsqueeze(-1).to(slots.dtype)).sum(dim=1).view(batch, seq, dim)
        if self.training and self.args.aux_loss_coeff > 0 and torch.is_grad_enabled():
            out = self._with_aux_loss(out, probs, counts)
        return out

    def _with_aux_loss(self, out: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # Global-batch balancing: the loads f are those of every rank's tokens (all ranks of the
        # stage run this layer on their part of the same micro-batch), the probabilities P this
        # rank's. The data-parallel mean of the ranks' losses is then the loss of the whole batch,
        # on every layout; f carries no gradient.
        counts = counts.float()
        if self.balance_group is not None:
            import torch.distributed as dist

            counts = counts.clone()
            dist.all_reduce(counts, group=self.balance_group)
        num_tokens = probs.shape[0]
        slot_fraction = counts / counts.sum()
        loss = self.args.num_experts * (slot_fraction * probs.mean(dim=0)).sum()
        self.last_aux_loss = loss.detach()
        weight = self.args.aux_loss_coeff
        if self.tokens_per_step:
            weight *= num_tokens / self.tokens_per_step
        return _AuxLossGrad.apply(out, loss * weight)

    @torch.no_grad()
    def update_expert_bias(self, counts: torch.Tensor) -> None:
        """Move each expert's bias towards balance, given its routed slots summed over the stage's ranks."""
        if self.expert_bias is None:
            return
        delta = self.args.load_balance_coeff * torch.sign(counts.mean() - counts)
        self.expert_bias += delta - delta.mean()

    @torch.no_grad()
    def init_buffers(self) -> None:
        if self.expert_bias is not None:
            self.expert_bias.zero_()
        self.tokens_per_expert.zero_()
