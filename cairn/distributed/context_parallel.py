"""Context parallelism: each sequence split over the ``cp`` ranks, attention across the shards.

**Load balancing.** A causal model's token ``t`` attends to ``t + 1`` keys, so an even cut of the
sequence would give the last rank most of the work. The sequence of S tokens is cut into 2N
chunks of S / 2N (N the CP degree) and cp rank ``r`` holds chunks ``r`` and ``2N - 1 - r``, one
early and one late (the head-tail layout of torch's ring attention and of Llama 3's training):
every rank then attends over the same number of (query, key) pairs. ``positions`` says which
tokens a rank holds; ``shard`` takes them from a batch (inputs and labels alike), and the model
cuts its rotary tables to the same positions, so every token is rotated by its own position.

**Attention across the shards** (``attention``), two ways:

- ``allgather`` (any device, the one the CPU suite runs): K and V are all-gathered over the cp
  group (one collective for both; its backward reduce-scatters their gradients, summed over
  every rank whose queries used them), put back into sequence order, and each of the rank's two
  query chunks attends to the keys up to its own end, causally (a mask aligned at the bottom
  right: on CUDA a flash kernel that skips the masked blocks). With grouped-query attention K
  and V are a fraction of the activations, which is why Llama 3 was trained this way.
- ``ring`` (CUDA only): torch's ring attention (``torch.distributed.tensor.experimental``), which
  passes K/V shards between the ranks and merges partial results; it needs CUDA's flash,
  efficient or cuDNN kernels.

**Loss and gradients.** Each rank's loss is the mean over its own tokens, and every rank holds
the same number of them (S / N of each sequence, no padding), so the mean over the dp x cp
ranks (FSDP's gradient average over dp_shard x cp, the logged loss's average) is the mean over
the whole global batch: exactly one process's loss and gradients on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cairn.config.manager import ConfigError

# torch 2.13 renamed the tensor collectives (the old names warn); 2.11 has only the old ones.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def load_balanced_positions(seq_len: int, degree: int, rank: int, device=None) -> torch.Tensor:
    """Positions of the tokens cp rank ``rank`` of ``degree`` holds: chunks ``rank`` and
    ``2 degree - 1 - rank`` of ``2 degree`` equal chunks, in that order."""
    if seq_len % (2 * degree):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x {degree} load-balanced chunks")
    chunk = seq_len // (2 * degree)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    last = torch.arange((2 * degree - 1 - rank) * chunk, (2 * degree - rank) * chunk, device=device)
    return torch.cat([first, last])


@dataclass
class ContextParallel:
    """One rank's place in its CP group: which tokens it holds and how its attention reaches the others'.

    ``mesh`` is the 1-D ``cp`` mesh, ``seq_len`` the whole sequence's length (``--training.seq_len``),
    ``method`` ``allgather`` or ``ring``.
    """

    mesh: object
    seq_len: int
    method: str = "allgather"
    degree: int = field(init=False)
    rank: int = field(init=False)

    def __post_init__(self) -> None:
        if self.method not in ("allgather", "ring"):
            raise ValueError(f"context-parallel attention must be allgather or ring (got {self.method!r})")
        self.degree, self.rank = self.mesh.size(), self.mesh.get_local_rank()
        if self.method == "ring":
            _enable_ring_attention()

    @property
    def group(self):
        return self.mesh.get_group()

    @property
    def local_len(self) -> int:
        return self.seq_len // self.degree

    def positions(self, device=None) -> torch.Tensor:
        return load_balanced_positions(self.seq_len, self.degree, self.rank, device)

    def shard(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of ``tensor`` (whole sequences along ``dim``)."""
        if tensor.shape[dim] != self.seq_len:
            raise ValueError(f"context parallelism splits sequences of {self.seq_len} tokens "
                             f"(--training.seq_len); got {tensor.shape[dim]}")
        return tensor.index_select(dim, self.positions(tensor.device))

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of this rank's queries over the whole sequence's keys: (batch, local seq,
        heads, head_dim) in, k and v with fewer (kv) heads; (batch, local seq, heads x head_dim) out."""
        if q.shape[1] != self.local_len:
            raise ValueError(f"context parallelism expects {self.local_len} tokens per rank "
                             f"(--training.seq_len {self.seq_len} / {self.degree}); got {q.shape[1]}")
        if self.method == "ring":
            return _ring_attention(q, k, v, self.mesh)
        return _allgather_attention(q, k, v, self)


class _GatherSequences(torch.autograd.Function):
    """All-gather over the cp group along dim 0; the backward reduce-scatters (sums) the gradient."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = local.new_empty((dist.get_world_size(group) * local.shape[0], *local.shape[1:]))
        _all_gather(out, local.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        _reduce_scatter(out, grad.contiguous(), group=ctx.group)
        return out, None


def _in_sequence_order(gathered: torch.Tensor, degree: int) -> torch.Tensor:
    """Rank-major shards (rank r: chunks r, 2N-1-r), each (2 x chunk, ...) on dim 1 of a
    (N x batch, ...) tensor, back to (batch, whole sequence, ...)."""
    shards = gathered.unflatten(0, (degree, -1)).unflatten(2, (2, -1))  # (N, batch, 2, chunk, ...)
    early = shards[:, :, 0].movedim(0, 1).flatten(1, 2)                  # chunks 0 .. N-1
    late = shards.flip(0)[:, :, 1].movedim(0, 1).flatten(1, 2)           # chunks N .. 2N-1
    return torch.cat([early, late], dim=1)


def _allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    from torch.nn.attention.bias import causal_lower_right

    head_dim = k.shape[-1]
    # One collective for K and V, before the grouped-query repeat: N x fewer bytes than after.
    kv = _GatherSequences.apply(torch.cat([k, v], dim=-1), cp.group)
    k_all, v_all = _in_sequence_order(kv, cp.degree).split(head_dim, dim=-1)
    n_rep = q.shape[2] // k.shape[2]
    if n_rep > 1:
        k_all = k_all.repeat_interleave(n_rep, dim=2)
        v_all = v_all.repeat_interleave(n_rep, dim=2)
    chunk = q.shape[1] // 2
    outputs = []
    for index, chunk_id in enumerate((cp.rank, 2 * cp.degree - 1 - cp.rank)):
        end = (chunk_id + 1) * chunk  # keys this chunk's queries may see: up to its own last token
        q_chunk = q[:, index * chunk:(index + 1) * chunk].transpose(1, 2)
        out = F.scaled_dot_product_attention(q_chunk, k_all[:, :end].transpose(1, 2), v_all[:, :end].transpose(1, 2),
                                             attn_mask=causal_lower_right(chunk, end))
        outputs.append(out.transpose(1, 2))
    return torch.cat(outputs, dim=1).flatten(2)


def _ring_attention_api():
    """torch's ring attention switches, or None where this torch lacks them (the API is
    experimental: torchtitan calls the same names)."""
    try:
        from torch.distributed.tensor.experimental._attention import (_cp_options,
                                                                      _enable_context_parallel_dispatcher)
    except ImportError:
        return None
    return _cp_options, _enable_context_parallel_dispatcher


def _enable_ring_attention() -> None:
    """Let DTensor dispatch SDPA on sequence-sharded inputs to torch's ring attention, with the
    head-tail load balancing ``load_balanced_positions`` lays out."""
    api = _ring_attention_api()
    if api is None:
        raise ConfigError([f"--parallelism.context_parallel_attention ring: torch {torch.__version__} has no "
                           "ring attention to dispatch to; use allgather"])
    options, enable_dispatcher = api
    options.enable_load_balance = True
    enable_dispatcher()


def _ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mesh) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Shard

    n_rep = q.shape[2] // k.shape[2]
    if n_rep > 1:  # torch's ring attention needs as many K/V heads as query heads
        k = k.repeat_interleave(n_rep, dim=2)
        v = v.repeat_interleave(n_rep, dim=2)
    # (batch, heads, seq, head_dim), the sequence (dim 2) sharded over cp
    q, k, v = (DTensor.from_local(x.transpose(1, 2), mesh, [Shard(2)], run_check=False) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.to_local().transpose(1, 2).flatten(2)


def resolve_method(method: str, device_type: str) -> str:
    """``auto``: torch's ring attention on CUDA (where this torch has it), the all-gather elsewhere."""
    if method == "auto":
        return "ring" if device_type == "cuda" and _ring_attention_api() is not None else "allgather"
    return method


def context_parallel_problems(parallel_dims, job_config, device_type: str) -> list[str]:
    """What context parallelism cannot do on this device, naming the flag (the config's own checks,
    seq_len against the degree, are ``JobConfig.problems``)."""
    method = job_config.parallelism.context_parallel_attention
    if parallel_dims.cp > 1 and resolve_method(method, device_type) == "ring" and device_type != "cuda":
        return [f"--parallelism.context_parallel_attention ring runs on CUDA only (torch's ring attention needs "
                f"CUDA's attention kernels); this run is on {device_type}: use allgather or auto"]
    return []


def build_context_parallel(parallel_dims, job_config, device_type: str) -> ContextParallel | None:
    """This rank's ContextParallel, or None when ``--parallelism.context_parallel_degree`` is 1."""
    if parallel_dims.cp == 1:
        return None
    return ContextParallel(parallel_dims.mesh["cp"], job_config.training.seq_len,
                           resolve_method(job_config.parallelism.context_parallel_attention, device_type))
