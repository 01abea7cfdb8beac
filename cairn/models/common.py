"""Building blocks every cairn model shares: RMSNorm, the SwiGLU feed-forward, per-FQN initialization.

``init_weights`` is what makes a model's first weights independent of the parallel layout: each
parameter is drawn whole from a generator seeded by ``(seed, crc32(fqn))`` and only the rank's
shard is kept. A model provides ``init_spec(fqn) -> (kind, std)`` and ``init_buffers(device)``.
"""

from __future__ import annotations

import abc
import zlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


class FeedForward(nn.Module):
    """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_parallel=None) -> torch.Tensor:
    """Causal grouped-query attention of (batch, seq, heads, head_dim) tensors, k and v with fewer
    (kv) heads; returns (batch, seq, heads x head_dim). With ``context_parallel`` (a
    ``cairn.distributed.context_parallel.ContextParallel``) the tensors hold this rank's tokens of
    longer sequences, and the queries attend to the keys of every rank."""
    if context_parallel is not None:
        return context_parallel.attention(q, k, v)
    n_rep = q.shape[2] // k.shape[2]
    if n_rep > 1:
        k = k.repeat_interleave(n_rep, dim=2)
        v = v.repeat_interleave(n_rep, dim=2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2).flatten(2)


class DecoderBlock(nn.Module, abc.ABC):
    """A transformer block: subclasses define ``_forward(x, cos, sin)``.

    ``activation_checkpoint`` (set for ``--activation_checkpoint.mode full``) recomputes the block
    in the backward pass. A flag rather than ``checkpoint_wrapper``, which would add
    ``_checkpoint_wrapped_module`` to every FQN.
    """

    def __init__(self, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.activation_checkpoint = False

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, use_reentrant=False)
        return self._forward(x, cos, sin)

    @abc.abstractmethod
    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor: ...


class Decoder(nn.Module):
    """A decoder-only transformer: the whole model, or one pipeline stage of it
    (``tok_embeddings``/``norm``/``output`` set to None).

    ``tok_embeddings``, ``layers`` (a ModuleDict keyed by the global layer index, so a pipeline
    stage keeps the whole model's FQNs), ``norm``, ``output`` (tied to the embedding with
    ``args.tie_word_embeddings``), and the rotary tables as non-persistent buffers: checkpoints
    hold weights only. ``block(layer_id, args)`` builds a layer (its ``attention`` has a
    ``context_parallel`` attribute), ``rope_tables(args, device)`` gives (cos, sin).

    Under context parallelism (``set_context_parallel``) the model sees this rank's tokens of each
    sequence, and the rotary tables hold the rows of those tokens' positions.
    """

    def __init__(self, args: Any, block: Callable[[int, Any], nn.Module],
                 rope_tables: Callable[..., tuple[torch.Tensor, torch.Tensor]], family: str):
        super().__init__()
        problems = args.problems()
        if problems:
            raise ValueError(f"invalid {family} model args: " + "; ".join(problems))
        self.args = args
        self._rope_tables = rope_tables
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict({str(i): block(i, args) for i in range(args.n_layers)})
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.context_parallel = None
        cos, sin = rope_tables(args)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def set_context_parallel(self, context_parallel) -> None:
        """Run on this rank's tokens of each sequence (``cairn.distributed.context_parallel``)."""
        self.context_parallel = context_parallel
        for layer in self.layers.values():
            layer.attention.context_parallel = context_parallel
        if not self.rope_cos.is_meta:
            Decoder.init_buffers(self)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (batch, seq) int ids, or (batch, seq, dim) activations for a later pipeline stage."""
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, self.rope_cos, self.rope_sin)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    def _apply(self, fn, recurse=True):
        # Module._apply gives each module a fresh Parameter where it cannot convert in place
        # (meta -> cpu in to_empty, for one), which would untie output from tok_embeddings.
        out = super()._apply(fn, recurse)
        tied = self.args.tie_word_embeddings and self.tok_embeddings is not None and self.output is not None
        if tied and self.output.weight is not self.tok_embeddings.weight:
            self.output.weight = self.tok_embeddings.weight
        return out

    @torch.no_grad()
    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the rotary tables (after ``to_empty`` from the meta device)."""
        device = device or self.rope_cos.device
        cos, sin = self._rope_tables(self.args, device=device)
        if self.context_parallel is not None:  # each token rotated by its position in the whole sequence
            positions = self.context_parallel.positions(device)
            cos, sin = cos[positions], sin[positions]
        self.rope_cos, self.rope_sin = cos, sin


def fill(tensor: torch.Tensor, kind: str, std: float, generator: torch.Generator) -> None:
    """Fill ``tensor`` the way ``init_spec`` says: "ones", "zeros", "normal" or "trunc_normal" (3 std)."""
    if kind == "ones":
        tensor.fill_(1.0)
    elif kind == "zeros":
        tensor.zero_()
    elif kind == "normal":
        tensor.normal_(0.0, std, generator=generator)
    else:
        nn.init.trunc_normal_(tensor, mean=0.0, std=std, a=-3 * std, b=3 * std, generator=generator)


def seeded_generator(seed: int, fqn: str, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + zlib.crc32(fqn.encode())) % (2**63))
    return generator


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, device: torch.device | str) -> None:
    """Initialize every parameter from a generator seeded by (seed, FQN).

    Each full tensor is drawn on ``device`` and only this rank's shard is kept, so every
    parallel layout (FSDP, TP, EP, PP, one process) starts from bit-identical weights on the
    same device type.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    device = torch.device(device)
    model.init_buffers(device)
    seen: set[int] = set()
    for fqn, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue  # tied weights: initialized once, through the first name
        seen.add(id(param))
        kind, std = model.init_spec(fqn)
        full = torch.empty(param.shape, dtype=torch.float32, device=device)
        fill(full, kind, std, seeded_generator(seed, fqn, device))
        if isinstance(param, DTensor):
            local = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
            param.to_local().copy_(local)
        else:
            param.copy_(full)
