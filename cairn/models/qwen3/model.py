"""Qwen3, dense and mixture-of-experts: GQA attention with per-head RMSNorm on queries and keys
(QK-norm), RoPE, RMSNorm, and a SwiGLU feed-forward or an MoE (``cairn.models.moe``) in every layer.

Parameter names follow torchtitan's Qwen3 (and cairn's Llama 3): ``tok_embeddings.weight``,
``layers.{i}.attention.{wq,wk,wv,wo,q_norm,k_norm}.weight``, ``layers.{i}.{attention,ffn}_norm.weight``,
dense ``layers.{i}.feed_forward.{w1,w2,w3}.weight``, MoE ``layers.{i}.moe.router.gate.weight``,
``layers.{i}.moe.experts.{w1,w2,w3}`` (grouped, ``[experts, ...]``) and, with auxiliary-loss-free
balancing, the buffer ``layers.{i}.moe.expert_bias``; ``norm.weight``, ``output.weight``.
``layers`` is a ModuleDict keyed by the global layer index, so pipeline stages keep these names.

RoPE rotates the two halves of each head (Hugging Face's layout), so the HF adapter only renames.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from cairn.models.common import Decoder, DecoderBlock, FeedForward, RMSNorm, causal_attention
from cairn.models.moe import MoE, MoEArgs


@dataclass(kw_only=True)
class Qwen3ModelArgs:
    dim: int = 4096
    n_layers: int = 36
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    """Qwen3's head size is its own (128), not dim / n_heads."""
    vocab_size: int = 151936
    hidden_dim: int = 12288
    """The dense SwiGLU hidden size (HF: intermediate_size); unused by MoE layers."""
    norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    max_seq_len: int = 4096
    """Length of the rotary tables; the trainer sets it to --training.seq_len."""
    tie_word_embeddings: bool = False
    moe: MoEArgs | None = None
    """Every layer's feed-forward is this MoE (Qwen3-MoE: decoder_sparse_step 1); None: dense."""
    extra: dict = field(default_factory=dict)

    @property
    def num_kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def num_params(self) -> int:
        d, h = self.dim, self.head_dim
        attn = d * self.n_heads * h * 2 + d * self.num_kv_heads * h * 2 + 2 * h
        if self.moe is None:
            ffn = 3 * d * self.hidden_dim
        else:
            ffn = 3 * d * self.moe.hidden_dim * self.moe.num_experts + d * self.moe.num_experts
        emb = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.n_layers * (attn + ffn + 2 * d) + emb + d

    def num_active_params(self) -> int:
        """Parameters a token passes through (its top_k experts only)."""
        if self.moe is None:
            return self.num_params()
        idle = 3 * self.dim * self.moe.hidden_dim * (self.moe.num_experts - self.moe.top_k)
        return self.num_params() - self.n_layers * idle

    def problems(self) -> list[str]:
        out = []
        if self.n_heads % self.num_kv_heads:
            out.append(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            out.append(f"head_dim {self.head_dim} must be even for RoPE")
        if self.moe is not None:
            out += self.moe.problems()
        return out


def rope_tables(args: Qwen3ModelArgs, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of (max_seq_len, head_dim / 2) angles."""
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    positions = torch.arange(args.max_seq_len, dtype=torch.float32, device=device)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (x[i], x[i + head_dim/2]) pairs of x: (batch, seq, heads, head_dim)."""
    seqlen = x.shape[1]
    cos = cos[:seqlen].view(1, seqlen, 1, -1).repeat(1, 1, 1, 2)
    sin = sin[:seqlen].view(1, seqlen, 1, -1).repeat(1, 1, 1, 2)
    x_float = x.float()
    first, second = x_float.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x_float * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: Qwen3ModelArgs):
        super().__init__()
        self.head_dim = args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.num_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.num_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.context_parallel = None  # set by Decoder.set_context_parallel
        self.q_norm = RMSNorm(args.head_dim, args.norm_eps)
        self.k_norm = RMSNorm(args.head_dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        bs, seqlen, _ = x.shape
        # -1 heads: under tensor parallelism each rank holds only its share of heads.
        q = self.q_norm(self.wq(x).view(bs, seqlen, -1, self.head_dim))
        k = self.k_norm(self.wk(x).view(bs, seqlen, -1, self.head_dim))
        v = self.wv(x).view(bs, seqlen, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.wo(causal_attention(q, k, v, self.context_parallel))


class TransformerBlock(DecoderBlock):
    def __init__(self, layer_id: int, args: Qwen3ModelArgs):
        super().__init__(layer_id)
        self.attention = Attention(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        if args.moe is None:
            self.feed_forward = FeedForward(args.dim, args.hidden_dim)
            self.moe = None
        else:
            self.feed_forward = None
            self.moe = MoE(args.dim, args.moe)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        ffn = self.moe if self.moe is not None else self.feed_forward
        return h + ffn(self.ffn_norm(h))


class Transformer(Decoder):
    """The whole model, or one pipeline stage of it (tok_embeddings/norm/output set to None)."""

    def __init__(self, args: Qwen3ModelArgs):
        super().__init__(args, TransformerBlock, rope_tables, "qwen3")

    # --- mixture of experts ---------------------------------------------------------------

    def moe_layers(self) -> list[MoE]:
        return [block.moe for block in self.layers.values() if block.moe is not None]

    def set_tokens_per_step(self, tokens: int) -> None:
        """Tokens one data-parallel rank trains on per optimizer step (under context parallelism, its
        share of them): weighs the load-balancing loss."""
        for moe in self.moe_layers():
            moe.tokens_per_step = tokens

    @torch.no_grad()
    def after_optimizer_step(self, group=None) -> dict[str, float]:
        """Update the balancing biases from this step's routed counts (summed over ``group``, the
        ranks of this pipeline stage) and reset the counts; returns load metrics of this stage:
        ``moe_load_max`` (the busiest expert's load over the mean, 1.0 = balanced) and
        ``moe_aux_loss`` (the load-balancing loss, mean over layers)."""
        import torch.distributed as dist

        layers = self.moe_layers()
        if not layers:
            return {}
        counts = torch.stack([moe.tokens_per_expert for moe in layers])
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(counts, group=group)
        for moe, layer_counts in zip(layers, counts):
            moe.update_expert_bias(layer_counts)
            moe.tokens_per_expert.zero_()
        metrics = {"moe_load_max": (counts.max(dim=1).values / counts.mean(dim=1).clamp(min=1e-9)).max().item()}
        losses = [moe.last_aux_loss for moe in layers if moe.last_aux_loss is not None]
        if losses:
            metrics["moe_aux_loss"] = torch.stack(losses).mean().item()
        return metrics

    # --- initialization -------------------------------------------------------------------

    @torch.no_grad()
    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """Recompute the rotary tables and zero the balancing state (after ``to_empty`` from meta)."""
        super().init_buffers(device)
        for moe in self.moe_layers():
            moe.init_buffers()

    def init_spec(self, fqn: str) -> tuple[str, float]:
        """How a parameter is initialized: ("ones", 0) or ("normal"|"trunc_normal", std)."""
        name = fqn.removesuffix(".weight")
        if name.endswith("norm"):
            return "ones", 0.0
        if name == "tok_embeddings":
            # Tied to the output projection (0.6B, 1.7B, 4B), the table also makes the logits.
            return ("trunc_normal", self.args.dim ** -0.5) if self.args.tie_word_embeddings else ("normal", 1.0)
        if name == "output":
            return "trunc_normal", self.args.dim ** -0.5
        layer_id = int(name.split(".")[1])
        depth_std = 0.02 / (2 * (layer_id + 1)) ** 0.5
        if name.endswith(("attention.wo", "feed_forward.w2", "feed_forward.w3", "experts.w2", "experts.w3")):
            return "trunc_normal", depth_std
        return "trunc_normal", 0.02
