"""Names of a decoder's weights in Hugging Face checkpoints, shared by the models' adapters.

Every cairn decoder names its tensors alike (``tok_embeddings.weight``, ``layers.<i>.<name>``,
``norm.weight``, ``output.weight``), as do HF's (``model.embed_tokens.weight``,
``model.layers.<i>.<name>``, ``model.norm.weight``, ``lm_head.weight``): an adapter lists its
per-layer names (``LAYER_KEYS``) and gets the mapping both ways, tied embeddings included (HF
then writes no ``lm_head.weight`` and ``output.weight`` is read from the embedding).
"""

from __future__ import annotations

import copy
import re
from typing import Any

from cairn.checkpoint.errors import HFCheckpointError

TOP_LEVEL_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_FROM_HF_TOP_LEVEL = {hf: fqn for fqn, hf in TOP_LEVEL_KEYS.items()}
LAYER_FQN = re.compile(r"layers\.(\d+)\.(.+)")
LAYER_HF_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Buffers some older HF exports carry; they are recomputed, never loaded.
_IGNORED_HF_KEY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


class DecoderHFNames:
    """cairn FQNs <-> HF keys of one decoder: subclasses set ``LAYER_KEYS`` (a layer's cairn name ->
    its HF name) and ``model_args`` (with ``tie_word_embeddings``), and may override ``architecture``."""

    LAYER_KEYS: dict[str, str] = {}

    def __init__(self, model_args: Any):
        self.model_args = model_args

    @property
    def architecture(self) -> str:
        return type(self).__name__

    def hf_key(self, fqn: str) -> str | None:
        """The HF key ``fqn`` is saved under; None when it is not saved (tied ``output.weight``)."""
        if fqn == "output.weight" and self.model_args.tie_word_embeddings:
            return None
        return self.hf_name(fqn)

    def hf_source_key(self, fqn: str) -> str:
        """The HF key ``fqn`` is loaded from (tied ``output.weight`` reads the embedding)."""
        if fqn == "output.weight" and self.model_args.tie_word_embeddings:
            return TOP_LEVEL_KEYS["tok_embeddings.weight"]
        return self.hf_name(fqn)

    def fqn(self, hf_key: str) -> str | None:
        """The cairn FQN an HF key fills; None for keys that are read by no parameter."""
        if self.is_ignored_hf_key(hf_key):
            return None
        if hf_key in _FROM_HF_TOP_LEVEL:
            return _FROM_HF_TOP_LEVEL[hf_key]
        match = LAYER_HF_KEY.fullmatch(hf_key)
        fqn = self.layer_fqn(match.group(2)) if match else None
        if fqn is None:
            raise HFCheckpointError(f"{hf_key!r} is not a key of a Hugging Face {self.architecture} checkpoint")
        return f"layers.{match.group(1)}.{fqn}"

    def layer_fqn(self, hf_name: str) -> str | None:
        """A layer's cairn name for its HF name (``self_attn.q_proj.weight``), or None."""
        return {hf: fqn for fqn, hf in self.LAYER_KEYS.items()}.get(hf_name)

    def is_ignored_hf_key(self, hf_key: str) -> bool:
        """Keys a checkpoint may carry that no parameter reads (stale buffers, a tied lm_head copy)."""
        tied_head = hf_key == "lm_head.weight" and self.model_args.tie_word_embeddings
        return tied_head or bool(_IGNORED_HF_KEY.fullmatch(hf_key))

    def hf_name(self, fqn: str) -> str:
        if fqn in TOP_LEVEL_KEYS:
            return TOP_LEVEL_KEYS[fqn]
        match = LAYER_FQN.fullmatch(fqn)
        if match and match.group(2) in self.LAYER_KEYS:
            return f"model.layers.{match.group(1)}.{self.LAYER_KEYS[match.group(2)]}"
        raise HFCheckpointError(f"{fqn!r} is not a {self.architecture} parameter with a Hugging Face name")

    def tensor_to_hf(self, fqn: str, tensor: Any) -> Any:
        """``fqn``'s tensor in HF's layout (the same, unless a model reorders it)."""
        return tensor

    def tensor_from_hf(self, fqn: str, tensor: Any) -> Any:
        """A tensor read for ``fqn`` in cairn's layout (the same, unless a model reorders it)."""
        return tensor

    @classmethod
    def fit_to_checkpoint(cls, model_args: Any, shapes: dict[str, tuple[int, ...]]) -> Any:
        """``model_args`` with the vocabulary size of a checkpoint's embedding (cairn sizes the
        vocabulary by the tokenizer, so a trained debug model's differs from its flavor's)."""
        embedding = shapes.get("tok_embeddings.weight") or shapes.get("output.weight")
        if embedding is None or embedding[0] == model_args.vocab_size:
            return model_args
        fitted = copy.deepcopy(model_args)
        fitted.vocab_size = int(embedding[0])
        return fitted
