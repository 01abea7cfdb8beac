"""Qwen3 weights <-> Hugging Face ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` (names, config.json).

Tensors keep their layout (both rotate the two halves of each head); only names change, and:

- an MoE layer's grouped experts (``layers.<i>.moe.experts.w1``, ``[experts, hidden, dim]``) are
  one Hugging Face key per expert (``model.layers.<i>.mlp.experts.<e>.gate_proj.weight``, the
  slice ``w1[e]``): ``hf_split_keys`` lists them, in expert order, so exports split and imports
  join them, and a rank that holds some experts reads only theirs;
- the auxiliary-loss-free balancing bias (``layers.<i>.moe.expert_bias``) has no place in a
  Hugging Face checkpoint: ``hf_dropped`` says so, exports name it as dropped and imports leave
  it at its initial value (zeros), saying so;
- with tied embeddings (0.6B, 1.7B, 4B) HF writes no ``lm_head.weight``: ``output.weight`` is
  filled from ``model.embed_tokens.weight``.
"""

from __future__ import annotations

import logging
import re

import torch

from cairn.checkpoint.errors import HFCheckpointError
from cairn.models.hf_names import LAYER_FQN, TOP_LEVEL_KEYS, DecoderHFNames
from cairn.models.moe import MoEArgs
from cairn.models.qwen3.flavors import qwen3_flavors
from cairn.models.qwen3.model import Qwen3ModelArgs

logger = logging.getLogger(__name__)

_DENSE = ("Qwen3ForCausalLM", "qwen3")
_MOE = ("Qwen3MoeForCausalLM", "qwen3_moe")
_DEFAULT_MAX_POSITIONS = 40960  # what the Qwen3 release's config.json files say
_DEFAULT_MAX_SEQ_LEN = 4096

_LAYER_KEYS = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "attention.q_norm.weight": "self_attn.q_norm.weight",
    "attention.k_norm.weight": "self_attn.k_norm.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "moe.router.gate.weight": "mlp.gate.weight",
}
_EXPERT_KEYS = {"moe.experts.w1": "gate_proj.weight", "moe.experts.w2": "down_proj.weight",
                "moe.experts.w3": "up_proj.weight"}
_BIAS = "moe.expert_bias"
_FROM_HF_EXPERT = {hf: fqn for fqn, hf in _EXPERT_KEYS.items()}
_EXPERT_HF_NAME = re.compile(r"mlp\.experts\.(\d+)\.(.+)")
# Model args that decide a tensor shape: a config.json differing in one of them cannot load.
_SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "num_kv_heads", "head_dim", "hidden_dim", "vocab_size",
                 "tie_word_embeddings")
_MOE_SHAPE_FIELDS = ("num_experts", "hidden_dim")


class Qwen3StateDictAdapter(DecoderHFNames):
    """cairn Qwen3 FQNs <-> Hugging Face Qwen3 / Qwen3-MoE keys, for one model size."""

    LAYER_KEYS = _LAYER_KEYS

    @property
    def architecture(self) -> str:
        return (_MOE if self.model_args.moe is not None else _DENSE)[0]

    # --- names (the rest: DecoderHFNames) ----------------------------------------------

    def hf_key(self, fqn: str) -> str | None:
        """The HF key ``fqn`` is saved under; None when it is not saved whole (tied output, a bias HF
        has no place for, grouped experts: see ``hf_split_keys``)."""
        if self.hf_dropped(fqn) or self.hf_split_keys(fqn) is not None:
            return None
        return super().hf_key(fqn)

    def hf_split_keys(self, fqn: str) -> list[str] | None:
        """For a grouped expert tensor, the HF key of each expert's slice (dim 0), in order."""
        match = LAYER_FQN.fullmatch(fqn)
        if not match or match.group(2) not in _EXPERT_KEYS or self.model_args.moe is None:
            return None
        layer, name = match.group(1), _EXPERT_KEYS[match.group(2)]
        return [f"model.layers.{layer}.mlp.experts.{e}.{name}" for e in range(self.model_args.moe.num_experts)]

    def tensor_group(self, fqn: str) -> tuple[str, int] | None:
        """("experts", E) for a grouped expert tensor: checkpoints count its experts on save and load."""
        keys = self.hf_split_keys(fqn)
        return ("experts", len(keys)) if keys is not None else None

    def hf_dropped(self, fqn: str) -> str | None:
        """Why ``fqn`` has no place in a Hugging Face checkpoint, or None."""
        if fqn.endswith("." + _BIAS):
            return ("the auxiliary-loss-free balancing bias: Qwen3-MoE checkpoints have no such tensor "
                    "(an import starts it at zero)")
        return None

    def layer_fqn(self, hf_name: str) -> str | None:
        """A layer's cairn name for its HF name; an expert's key names the grouped tensor."""
        expert = _EXPERT_HF_NAME.fullmatch(hf_name)
        if expert:
            return _FROM_HF_EXPERT.get(expert.group(2))
        return super().layer_fqn(hf_name)

    def hf_keys(self) -> list[str]:
        """Every key a full export of this model size writes, in file order."""
        args = self.model_args
        keys = [TOP_LEVEL_KEYS["tok_embeddings.weight"]]
        for layer in range(args.n_layers):
            for fqn in _LAYER_KEYS:
                if fqn.startswith("feed_forward." if args.moe is not None else "moe."):
                    continue
                keys.append(f"model.layers.{layer}.{_LAYER_KEYS[fqn]}")
            for fqn in _EXPERT_KEYS if args.moe is not None else ():
                keys += self.hf_split_keys(f"layers.{layer}.{fqn}")
        keys.append(TOP_LEVEL_KEYS["norm.weight"])
        if not args.tie_word_embeddings:
            keys.append(TOP_LEVEL_KEYS["output.weight"])
        return keys

    # --- config.json ------------------------------------------------------------------

    def to_hf_config(self, dtype: torch.dtype | str = "bfloat16", *, bos_token_id: int | None = None,
                     eos_token_id: int | list[int] | None = None) -> dict:
        """A ``Qwen3ForCausalLM`` / ``Qwen3MoeForCausalLM`` config.json (transformers 4.51+ and 5.x)."""
        args = self.model_args
        architecture, model_type = _MOE if args.moe is not None else _DENSE
        config = {
            "architectures": [architecture],
            "model_type": model_type,
            "hidden_size": args.dim,
            "intermediate_size": args.hidden_dim,
            "num_hidden_layers": args.n_layers,
            "num_attention_heads": args.n_heads,
            "num_key_value_heads": args.num_kv_heads,
            "head_dim": args.head_dim,
            "hidden_act": "silu",
            "vocab_size": args.vocab_size,
            "rms_norm_eps": args.norm_eps,
            "rope_theta": args.rope_theta,
            "rope_scaling": None,
            "max_position_embeddings": int(args.extra.get("max_position_embeddings", _DEFAULT_MAX_POSITIONS)),
            "tie_word_embeddings": args.tie_word_embeddings,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "initializer_range": 0.02,
            "use_cache": True,
            "torch_dtype": str(dtype).removeprefix("torch."),
        }
        if args.moe is not None:
            config.update({"num_experts": args.moe.num_experts, "num_experts_per_tok": args.moe.top_k,
                           "moe_intermediate_size": args.moe.hidden_dim, "norm_topk_prob": args.moe.norm_topk_prob,
                           "router_aux_loss_coef": args.moe.aux_loss_coeff, "decoder_sparse_step": 1,
                           "mlp_only_layers": [], "output_router_logits": False})
        if bos_token_id is not None:
            config["bos_token_id"] = bos_token_id
        if eos_token_id is not None:
            config["eos_token_id"] = eos_token_id
        return config

    @classmethod
    def from_hf_config(cls, config: dict, source: str = "config.json") -> Qwen3ModelArgs:
        """Model args of a Qwen3 / Qwen3-MoE config.json; refuses anything cairn's Qwen3 cannot run."""
        problems = _unsupported_config_problems(config)
        if problems:
            raise HFCheckpointError(f"{source}: not a Qwen3 checkpoint cairn can load: " + "; ".join(problems))
        max_positions = int(config.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS)
        moe = None
        if config["model_type"] == _MOE[1]:
            moe = MoEArgs(num_experts=int(config.get("num_experts") or config["num_local_experts"]),
                          top_k=int(config["num_experts_per_tok"]), hidden_dim=int(config["moe_intermediate_size"]),
                          norm_topk_prob=bool(config.get("norm_topk_prob", False)),
                          aux_loss_coeff=float(config.get("router_aux_loss_coef", 0.001)))
        n_heads = int(config["num_attention_heads"])
        return Qwen3ModelArgs(
            dim=int(config["hidden_size"]), n_layers=int(config["num_hidden_layers"]), n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            head_dim=int(config.get("head_dim") or int(config["hidden_size"]) // n_heads),
            vocab_size=int(config["vocab_size"]), hidden_dim=int(config["intermediate_size"]),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(config),
            max_seq_len=min(max_positions, _DEFAULT_MAX_SEQ_LEN),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)), moe=moe,
            extra={"max_position_embeddings": max_positions})

    @classmethod
    def match_flavor(cls, config: dict) -> str | None:
        """The qwen3 flavor whose tensor shapes are those of this config.json, if any."""
        args = cls.from_hf_config(config)
        for name, flavor in qwen3_flavors.items():
            if not _shape_differences(flavor, args):
                return name
        return None

    def check_hf_config(self, config: dict, source: str = "config.json") -> None:
        """Raise if ``config`` is another architecture or another model size than this adapter's."""
        theirs = self.from_hf_config(config, source)
        diffs = _shape_differences(theirs, self.model_args)
        if diffs:
            flavor = self.match_flavor(config)
            hint = f" (it matches qwen3 flavor {flavor!r})" if flavor else ""
            raise HFCheckpointError(f"{source} describes another model size{hint}: " + ", ".join(diffs)
                                    + " (checkpoint vs model); check the model flavor (--model.flavor, or "
                                    "--model_flavor of the conversion scripts)")
        ours = self.model_args
        if (theirs.rope_theta, theirs.norm_eps) != (ours.rope_theta, ours.norm_eps):
            logger.warning("%s: rope_theta/rms_norm_eps differ from the model's (%s, %s vs %s, %s); loading the "
                           "weights anyway", source, theirs.rope_theta, theirs.norm_eps, ours.rope_theta,
                           ours.norm_eps)


def _shape_differences(theirs: Qwen3ModelArgs, ours: Qwen3ModelArgs) -> list[str]:
    diffs = [f"{f} {getattr(theirs, f)} vs {getattr(ours, f)}" for f in _SHAPE_FIELDS
             if getattr(theirs, f) != getattr(ours, f) and not (f == "hidden_dim" and ours.moe is not None)]
    if (theirs.moe is None) != (ours.moe is None):
        diffs.append(f"{'mixture of experts' if theirs.moe else 'dense'} vs "
                     f"{'mixture of experts' if ours.moe else 'dense'}")
    elif theirs.moe is not None:
        diffs += [f"moe {f} {getattr(theirs.moe, f)} vs {getattr(ours.moe, f)}" for f in _MOE_SHAPE_FIELDS
                  if getattr(theirs.moe, f) != getattr(ours.moe, f)]
    return diffs


def _unsupported_config_problems(config: dict) -> list[str]:
    architectures = config.get("architectures") or []
    known = {_DENSE[1]: _DENSE[0], _MOE[1]: _MOE[0]}
    model_type = config.get("model_type")
    if model_type not in known or (architectures and known[model_type] not in architectures):
        return [f"architectures {architectures} / model_type {model_type!r} (expected "
                f"[{_DENSE[0]!r}] / {_DENSE[1]!r} or [{_MOE[0]!r}] / {_MOE[1]!r})"]
    required = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"]
    if model_type == _MOE[1]:
        required += ["num_experts_per_tok", "moe_intermediate_size"]
        if "num_experts" not in config and "num_local_experts" not in config:
            required.append("num_experts")
    missing = [k for k in required if k not in config]
    if missing:
        return [f"missing {', '.join(missing)}"]
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (cairn's Qwen3 uses silu)")
    if config.get("attention_bias"):
        problems.append("attention_bias true (cairn's Qwen3 has no biases)")
    if config.get("use_sliding_window"):
        problems.append("use_sliding_window true (cairn's Qwen3 attends to the whole sequence)")
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (cairn's Qwen3 supports default)")
    if model_type == _MOE[1]:
        if int(config.get("decoder_sparse_step", 1)) != 1 or config.get("mlp_only_layers"):
            problems.append("decoder_sparse_step != 1 or mlp_only_layers (cairn's Qwen3-MoE has an MoE in every "
                            "layer)")
        if int(config.get("shared_expert_intermediate_size") or 0):
            problems.append("a shared expert (cairn's Qwen3-MoE has none)")
    return problems


def _rope_theta(config: dict) -> float:
    # transformers 5 writes "rope_parameters" (theta inside); 4.x writes "rope_theta".
    params = config.get("rope_parameters") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 1_000_000.0)))
