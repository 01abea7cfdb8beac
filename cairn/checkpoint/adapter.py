"""How a model's weights map to Hugging Face's: the adapter protocol, and one for transformers models.

Models implement ``StateDictAdapter`` (cairn's Llama 3: ``cairn/models/llama3/state_dict_adapter.py``)
and import only this module and ``errors``: the HF reading and writing in ``hf.py`` knows
nothing of any model but this protocol. ``TransformersAdapter`` serves a model that already
is a transformers ``PreTrainedModel``: its state dict keys are the Hugging Face keys.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from cairn.checkpoint.errors import HFCheckpointError

CONFIG_FILE = "config.json"


class StateDictAdapter(Protocol):
    """What ``save_hf``/``load_hf`` need from a model's adapter. Conversions keep shapes.

    The offline conversions (``cairn.checkpoint.convert``) also use ``fqn(hf_key)`` and the
    classmethods ``from_hf_config(config, source)``, ``match_flavor(config)`` and
    ``fit_to_checkpoint(model_args, fqn_shapes)``.

    Two optional methods (``hf_parts``/``hf_sources`` below read them; an adapter without them
    maps every tensor to one key): ``hf_split_keys(fqn)``, the keys of a tensor Hugging Face
    stores one slice along dim 0 at a time (an MoE layer's grouped experts: one key per expert),
    in slice order, else None; ``hf_dropped(fqn)``, why a model tensor has no place in a Hugging
    Face checkpoint (exports name it as dropped, imports set it to zeros and name it), else None.
    A third, ``tensor_group(fqn)``, is the checkpoint's: ``(group, members)`` for a tensor whose dim 0
    indexes members of a group (``("experts", 8)``), counted on every save and load (``groups.py``).
    """

    def hf_key(self, fqn: str) -> str | None: ...  # None: not saved (e.g. a tied output)
    def hf_source_key(self, fqn: str) -> str: ...  # the key fqn is loaded from
    def hf_keys(self) -> list[str]: ...  # every key of a full export
    def is_ignored_hf_key(self, hf_key: str) -> bool: ...
    def tensor_to_hf(self, fqn: str, tensor: torch.Tensor) -> torch.Tensor: ...
    def tensor_from_hf(self, fqn: str, tensor: torch.Tensor) -> torch.Tensor: ...
    def to_hf_config(self, dtype: torch.dtype | str, *, bos_token_id=None, eos_token_id=None) -> dict: ...
    def check_hf_config(self, config: dict, source: str = CONFIG_FILE) -> None: ...


def hf_parts(adapter: StateDictAdapter, fqn: str) -> list[tuple[str, int | None]]:
    """(HF key, slice of dim 0 or None for the whole tensor) of each tensor ``fqn`` is exported as;
    [] when it is not exported (a tied output, a dropped tensor)."""
    split = getattr(adapter, "hf_split_keys", None)
    keys = split(fqn) if split is not None else None
    if keys is not None:
        return list(zip(keys, range(len(keys))))
    key = adapter.hf_key(fqn)
    return [] if key is None else [(key, None)]


def hf_sources(adapter: StateDictAdapter, fqn: str) -> list[tuple[str, int | None]]:
    """(HF key, slice of dim 0 or None) of each tensor ``fqn`` is loaded from; [] for a dropped tensor."""
    if hf_dropped(adapter, fqn):
        return []
    split = getattr(adapter, "hf_split_keys", None)
    keys = split(fqn) if split is not None else None
    if keys is not None:
        return list(zip(keys, range(len(keys))))
    return [(adapter.hf_source_key(fqn), None)]


def hf_dropped(adapter: StateDictAdapter, fqn: str) -> str | None:
    """Why ``fqn`` has no place in a Hugging Face checkpoint; None when it has one."""
    dropped = getattr(adapter, "hf_dropped", None)
    return dropped(fqn) if dropped is not None else None


class TransformersAdapter:
    """The adapter of a transformers model: keys map to themselves, ``config.json`` is the model's.

    Tied weights (``lm_head.weight`` sharing ``model.embed_tokens.weight``) are written once, as
    transformers writes them, and filled from the embedding when loaded.
    """

    def __init__(self, model: Any):
        self.config = model.config
        self._keys = list(model.state_dict().keys())
        tied = getattr(model, "_tied_weights_keys", None) or []
        if isinstance(tied, dict):  # newer transformers: {tied key: source key}
            self._tied = {key: source for key, source in tied.items()}
        else:
            self._tied = {key: self._tie_source(key) for key in tied}
        if not getattr(self.config, "tie_word_embeddings", False):
            self._tied = {}
        self._tied = {key: source for key, source in self._tied.items() if key in self._keys and source in self._keys}

    def _tie_source(self, key: str) -> str | None:
        embeddings = [k for k in self._keys if k.endswith("embed_tokens.weight")]
        return embeddings[0] if key.endswith("lm_head.weight") and embeddings else None

    def hf_key(self, fqn: str) -> str | None:
        return None if fqn in self._tied else fqn

    def hf_source_key(self, fqn: str) -> str:
        return self._tied.get(fqn, fqn)

    def hf_keys(self) -> list[str]:
        return [key for key in self._keys if key not in self._tied]

    def is_ignored_hf_key(self, hf_key: str) -> bool:
        return False

    def tensor_to_hf(self, fqn: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def tensor_from_hf(self, fqn: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def to_hf_config(self, dtype: torch.dtype | str, *, bos_token_id=None, eos_token_id=None) -> dict:
        config = self.config.to_dict()
        config["torch_dtype"] = str(dtype).removeprefix("torch.")
        if bos_token_id is not None:
            config["bos_token_id"] = bos_token_id
        if eos_token_id is not None:
            config["eos_token_id"] = eos_token_id
        return config

    def check_hf_config(self, config: dict, source: str = CONFIG_FILE) -> None:
        mine = self.config.to_dict()
        shape_keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "intermediate_size", "vocab_size")
        different = [f"{key}: {config.get(key)!r} there, {mine.get(key)!r} in the model" for key in shape_keys
                     if key in config and key in mine and config[key] != mine[key]]
        if different:
            raise HFCheckpointError(f"{source} describes another model: " + "; ".join(different))
