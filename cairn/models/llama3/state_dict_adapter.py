"""Llama 3 weights <-> Hugging Face ``LlamaForCausalLM`` (names, rotary layout, config.json).

Two differences besides the names. cairn (like Meta's original checkpoints) rotates
interleaved pairs ``(x[2i], x[2i+1])`` of each head of ``wq``/``wk``; Hugging Face rotates
the two halves ``(x[i], x[i + head_dim/2])``. Exporting reorders each head's output rows
from interleaved to half-split (and back on import); ``wk`` has ``n_kv_heads`` heads. And
with tied embeddings HF writes no ``lm_head.weight``: ``output.weight`` is filled from
``model.embed_tokens.weight``.

Every conversion is per key, so callers can stream a model through it one tensor at a time,
and maps a tensor to one of the same shape.
"""

from __future__ import annotations

import logging

import torch

from cairn.checkpoint.errors import HFCheckpointError
from cairn.models.hf_names import TOP_LEVEL_KEYS, DecoderHFNames
from cairn.models.llama3.flavors import llama3_flavors
from cairn.models.llama3.model import TransformerModelArgs

logger = logging.getLogger(__name__)

_ARCHITECTURE = "LlamaForCausalLM"
_MODEL_TYPE = "llama"
# The context length Llama 3.1/3.2 publish for their scaled RoPE.
_SCALED_ROPE_CONTEXT = 131072
_DEFAULT_MAX_SEQ_LEN = 8192

_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Model args that decide a tensor shape: a config.json differing in one of them cannot load.
_SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "num_kv_heads", "ffn_hidden_dim", "vocab_size",
                 "tie_word_embeddings")


def interleaved_to_half_split(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reorder each head's rows from (x0, y0, x1, y1, ...) to (x0, x1, ..., y0, y1, ...)."""
    rows, cols = weight.shape
    return weight.view(num_heads, rows // num_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def half_split_to_interleaved(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of ``interleaved_to_half_split``."""
    rows, cols = weight.shape
    return weight.view(num_heads, 2, rows // num_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


class Llama3StateDictAdapter(DecoderHFNames):
    """cairn Llama 3 FQNs <-> Hugging Face ``LlamaForCausalLM`` keys, for one model size."""

    LAYER_KEYS = _LAYER_KEYS
    architecture = _ARCHITECTURE

    # --- names: DecoderHFNames --------------------------------------------------------

    def hf_keys(self) -> list[str]:
        """Every key a full export of this model size writes, in file order."""
        args = self.model_args
        keys = [TOP_LEVEL_KEYS["tok_embeddings.weight"]]
        for layer in range(args.n_layers):
            keys += [f"model.layers.{layer}.{name}" for name in _LAYER_KEYS.values()]
        keys.append(TOP_LEVEL_KEYS["norm.weight"])
        if not args.tie_word_embeddings:
            keys.append(TOP_LEVEL_KEYS["output.weight"])
        return keys

    # --- tensors ----------------------------------------------------------------------

    def tensor_to_hf(self, fqn: str, tensor: torch.Tensor) -> torch.Tensor:
        heads = self._rotary_heads(fqn)
        return interleaved_to_half_split(tensor, heads) if heads else tensor

    def tensor_from_hf(self, fqn: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` read from ``hf_source_key(fqn)``, in cairn's layout."""
        heads = self._rotary_heads(fqn)
        return half_split_to_interleaved(tensor, heads) if heads else tensor

    def _rotary_heads(self, fqn: str) -> int:
        if fqn.endswith(".attention.wq.weight"):
            return self.model_args.n_heads
        if fqn.endswith(".attention.wk.weight"):
            return self.model_args.num_kv_heads
        return 0

    def convert_to_hf(self, fqn: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """(HF key, tensor in HF layout), or None when ``fqn`` is not saved (tied output)."""
        key = self.hf_key(fqn)
        return None if key is None else (key, self.tensor_to_hf(fqn, tensor))

    def convert_from_hf(self, hf_key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """(FQN, tensor in cairn layout), or None for a key no parameter reads."""
        fqn = self.fqn(hf_key)
        return None if fqn is None else (fqn, self.tensor_from_hf(fqn, tensor))

    def to_hf(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for fqn, tensor in state_dict.items():
            converted = self.convert_to_hf(fqn, tensor)
            if converted is not None:
                out[converted[0]] = converted[1]
        return out

    def from_hf(self, hf_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """cairn state dict; with tied embeddings ``output.weight`` is the embedding, as in the model."""
        out = {}
        for key, tensor in hf_state_dict.items():
            converted = self.convert_from_hf(key, tensor)
            if converted is not None:
                out[converted[0]] = converted[1]
        if self.model_args.tie_word_embeddings and "tok_embeddings.weight" in out:
            out["output.weight"] = out["tok_embeddings.weight"]
        return out

    # --- config.json ------------------------------------------------------------------

    def to_hf_config(self, dtype: torch.dtype | str = "bfloat16", *, bos_token_id: int | None = None,
                     eos_token_id: int | list[int] | None = None) -> dict:
        """A ``LlamaForCausalLM`` config.json (transformers 4.45+ and 5.x read it)."""
        args = self.model_args
        dtype_name = str(dtype).removeprefix("torch.")
        rope_scaling = None
        if args.rope_scaling:
            rope_scaling = {"rope_type": "llama3", "factor": float(args.rope_scaling["factor"]),
                            "low_freq_factor": float(args.rope_scaling.get("low_freq_factor", 1.0)),
                            "high_freq_factor": float(args.rope_scaling.get("high_freq_factor", 4.0)),
                            "original_max_position_embeddings":
                                int(args.rope_scaling.get("original_max_position_embeddings", 8192))}
        config = {
            "architectures": [_ARCHITECTURE],
            "model_type": _MODEL_TYPE,
            "hidden_size": args.dim,
            "intermediate_size": args.ffn_hidden_dim,
            "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.num_kv_heads,
            "head_dim": args.head_dim,
            "hidden_act": "silu",
            "vocab_size": args.vocab_size,
            "rms_norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self._max_position_embeddings(),
            "tie_word_embeddings": args.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": dtype_name,
        }
        if bos_token_id is not None:
            config["bos_token_id"] = bos_token_id
        if eos_token_id is not None:
            config["eos_token_id"] = eos_token_id
        return config

    def _max_position_embeddings(self) -> int:
        args = self.model_args
        if "max_position_embeddings" in args.extra:  # carried over from an imported config.json
            return int(args.extra["max_position_embeddings"])
        return _SCALED_ROPE_CONTEXT if args.rope_scaling else args.max_seq_len

    @classmethod
    def from_hf_config(cls, config: dict, source: str = "config.json") -> TransformerModelArgs:
        """Model args of a ``LlamaForCausalLM`` config.json; refuses anything cairn's Llama cannot run."""
        problems = _unsupported_config_problems(config)
        if problems:
            raise HFCheckpointError(f"{source}: not a Llama 3 checkpoint cairn can load: " + "; ".join(problems))
        dim, n_heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        multiple_of, ffn_dim_multiplier = _ffn_sizing(dim, int(config["intermediate_size"]))
        max_positions = int(config.get("max_position_embeddings") or _DEFAULT_MAX_SEQ_LEN)
        rope_theta, rope_scaling = _rope_settings(config)
        args = TransformerModelArgs(
            dim=dim, n_layers=int(config["num_hidden_layers"]), n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            vocab_size=int(config["vocab_size"]), multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier,
            norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta, rope_scaling=rope_scaling,
            max_seq_len=min(max_positions, _DEFAULT_MAX_SEQ_LEN),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            extra={"max_position_embeddings": max_positions})
        if args.ffn_hidden_dim != int(config["intermediate_size"]):
            raise HFCheckpointError(f"{source}: intermediate_size {config['intermediate_size']} cannot be "
                                    f"expressed by cairn's Llama FFN sizing")
        return args

    @classmethod
    def match_flavor(cls, config: dict) -> str | None:
        """The llama3 flavor whose tensor shapes are those of this config.json, if any."""
        args = cls.from_hf_config(config)
        for name, flavor in llama3_flavors.items():
            if all(getattr(flavor, f) == getattr(args, f) for f in _SHAPE_FIELDS):
                return name
        return None

    def check_hf_config(self, config: dict, source: str = "config.json") -> None:
        """Raise if ``config`` is another architecture or another model size than this adapter's."""
        theirs = self.from_hf_config(config, source)
        ours = self.model_args
        diffs = [f"{f} {getattr(theirs, f)} vs {getattr(ours, f)}" for f in _SHAPE_FIELDS
                 if getattr(theirs, f) != getattr(ours, f)]
        if diffs:
            flavor = self.match_flavor(config)
            hint = f" (it matches llama3 flavor {flavor!r})" if flavor else ""
            raise HFCheckpointError(f"{source} describes another model size{hint}: "
                                    + ", ".join(diffs) + " (checkpoint vs model); check the model flavor "
                                    "(--model.flavor, or --model_flavor of the conversion scripts)")
        if (theirs.rope_theta, theirs.rope_scaling, theirs.norm_eps) != \
                (ours.rope_theta, ours.rope_scaling, ours.norm_eps):
            logger.warning("%s: rope_theta/rope_scaling/rms_norm_eps differ from the model's "
                           "(%s, %s, %s vs %s, %s, %s); loading the weights anyway", source,
                           theirs.rope_theta, theirs.rope_scaling, theirs.norm_eps,
                           ours.rope_theta, ours.rope_scaling, ours.norm_eps)


def _unsupported_config_problems(config: dict) -> list[str]:
    problems = []
    architectures = config.get("architectures") or [_ARCHITECTURE]
    if config.get("model_type") != _MODEL_TYPE or _ARCHITECTURE not in architectures:
        problems.append(f"architectures {config.get('architectures')} / model_type {config.get('model_type')!r} "
                        f"(expected [{_ARCHITECTURE!r}] / {_MODEL_TYPE!r})")
        return problems
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in config]
    if missing:
        return [f"missing {', '.join(missing)}"]
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (cairn's Llama uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            problems.append(f"{flag} true (cairn's Llama has no biases)")
    head_dim = config.get("head_dim")
    if head_dim and head_dim * config["num_attention_heads"] != config["hidden_size"]:
        problems.append(f"head_dim {head_dim} != hidden_size / num_attention_heads")
    rope_type = _rope_parameters(config).get("rope_type") or _rope_parameters(config).get("type") or "default"
    if rope_type not in ("default", "llama3"):
        problems.append(f"rope type {rope_type!r} (cairn supports default and llama3)")
    return problems


def _rope_parameters(config: dict) -> dict:
    # transformers 5 writes "rope_parameters" (theta inside); 4.x writes "rope_scaling" + "rope_theta".
    return config.get("rope_parameters") or config.get("rope_scaling") or {}


def _rope_settings(config: dict) -> tuple[float, dict | None]:
    params = _rope_parameters(config)
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    if (params.get("rope_type") or params.get("type")) != "llama3":
        return theta, None
    scaling = {"factor": float(params["factor"]),
               "low_freq_factor": float(params.get("low_freq_factor", 1.0)),
               "high_freq_factor": float(params.get("high_freq_factor", 4.0)),
               "original_max_position_embeddings": int(params.get("original_max_position_embeddings", 8192))}
    return theta, scaling


def _ffn_sizing(dim: int, intermediate_size: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) whose ``ffn_hidden_dim`` is ``intermediate_size``.

    A published flavor's own values are preferred, so an imported 8B has 8B's model args.
    """
    for flavor in llama3_flavors.values():
        if flavor.dim == dim and flavor.ffn_hidden_dim == intermediate_size:
            return flavor.multiple_of, flavor.ffn_dim_multiplier
    base = int(2 * (4 * dim) / 3)
    multiple_of = intermediate_size & -intermediate_size  # largest power of two dividing it
    multiple_of = min(multiple_of, 1024)
    for multiplier in (None, intermediate_size / base):
        args = TransformerModelArgs(dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=multiplier)
        if args.ffn_hidden_dim == intermediate_size:
            return multiple_of, multiplier
    # Float rounding put int(multiplier * base) just below a multiple: nudge the multiplier up.
    multiplier = (intermediate_size + 0.5) / base
    return 1, multiplier
