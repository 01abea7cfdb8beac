"""Llama 3: RoPE (with Llama 3.1 frequency scaling), grouped-query attention, RMSNorm, SwiGLU.

Parameter names are torchtitan's (and Meta's original) Llama 3 FQNs:
``tok_embeddings.weight``, ``layers.{i}.attention.{wq,wk,wv,wo}.weight``,
``layers.{i}.feed_forward.{w1,w2,w3}.weight``, ``layers.{i}.{attention,ffn}_norm.weight``,
``norm.weight``, ``output.weight``. ``layers`` is a ModuleDict keyed by the layer's
global index, so a pipeline stage that keeps layers 4..7 still names them ``layers.4``...

RoPE rotates interleaved pairs (Meta's layout); the HF adapter permutes wq/wk to HF's
half-split layout. The rotary tables are non-persistent buffers: checkpoints hold weights only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

# init_weights: re-exported (cairn.models.llama3.init_weights)
from cairn.models.common import (Decoder, DecoderBlock, FeedForward, RMSNorm, causal_attention,  # noqa: F401
                                 init_weights)


@dataclass(kw_only=True)
class TransformerModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    vocab_size: int = 128256
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None
    """Llama 3.1 scaling: {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}."""
    max_seq_len: int = 8192
    """Length of the rotary tables; the trainer sets it to --training.seq_len."""
    tie_word_embeddings: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def num_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def num_params(self) -> int:
        d, h, kv = self.dim, self.head_dim, self.num_kv_heads
        attn = d * self.n_heads * h * 2 + d * kv * h * 2
        ffn = 3 * d * self.ffn_hidden_dim
        per_layer = attn + ffn + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * per_layer + emb + d

    def problems(self) -> list[str]:
        out = []
        if self.dim % self.n_heads:
            out.append(f"model dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.num_kv_heads:
            out.append(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            out.append(f"head_dim {self.head_dim} must be even for RoPE")
        return out


def rope_frequencies(args: TransformerModelArgs) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama 3.1's long-context scaling if configured."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = args.rope_scaling
    if not scaling:
        return inv_freq.float()
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    is_medium = (wavelen <= low_freq_wavelen) & (wavelen >= high_freq_wavelen)
    return torch.where(is_medium, smoothed, out).float()


def rope_tables(args: TransformerModelArgs, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = rope_frequencies(args).to(device)
    positions = torch.arange(args.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x: (batch, seq, heads, head_dim)."""
    seqlen = x.shape[1]
    cos = cos[:seqlen].view(1, seqlen, 1, -1)
    sin = sin[:seqlen].view(1, seqlen, 1, -1)
    x_pairs = x.float().unflatten(-1, (-1, 2))
    x0, x1 = x_pairs[..., 0], x_pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: TransformerModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.num_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.num_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.context_parallel = None  # set by Decoder.set_context_parallel

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds only its share of heads.
        q = self.wq(x).view(bs, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bs, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.wo(causal_attention(q, k, v, self.context_parallel))


class TransformerBlock(DecoderBlock):
    def __init__(self, layer_id: int, args: TransformerModelArgs):
        super().__init__(layer_id)
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(Decoder):
    """The whole model, or one pipeline stage of it (tok_embeddings/norm/output set to None)."""

    def __init__(self, args: TransformerModelArgs):
        super().__init__(args, TransformerBlock, rope_tables, "llama3")

    def init_spec(self, fqn: str) -> tuple[str, float]:
        """How a parameter is initialized: ("ones", 0) or ("normal"|"trunc_normal", std)."""
        name = fqn.removesuffix(".weight")
        if name.endswith("norm"):
            return "ones", 0.0
        if name == "tok_embeddings":
            # Tied to the output projection (Llama 3.2 1B/3B), the table also makes the logits:
            # the output's scale keeps the first loss near log(vocab) instead of in the thousands.
            if self.args.tie_word_embeddings:
                return "trunc_normal", self.args.dim ** -0.5
            return "normal", 1.0
        if name == "output":
            return "trunc_normal", self.args.dim ** -0.5
        layer_id = int(name.split(".")[1])
        depth_std = 0.02 / (2 * (layer_id + 1)) ** 0.5
        if name.endswith(("attention.wo", "feed_forward.w2", "feed_forward.w3")):
            return "trunc_normal", depth_std
        return "trunc_normal", 0.02
