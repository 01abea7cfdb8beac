"""The tokenizer: a Hugging Face ``tokenizer.json`` with Llama 3's bos/eos conventions.

cairn adds ``<|begin_of_text|>`` / ``<|end_of_text|>`` itself (``encode(bos=, eos=)``)
rather than through the file's post-processor, so any ``tokenizer.json`` whose vocabulary
has those two tokens works: the bundled one (scripts/train_tokenizer.py) or a real Llama 3's.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from cairn.data.paths import not_found_message, resolve_path

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"


class Tokenizer:
    """``Tokenizer("assets/tokenizer/tokenizer.json").encode("text")`` -> ``[bos, ..., eos]``."""

    def __init__(self, path: str | Path):
        resolved = resolve_path(path)
        if resolved is None or not resolved.is_file():
            raise FileNotFoundError(
                not_found_message("--model.tokenizer_path", path)
                + "; point it at a Hugging Face tokenizer.json (the bundled one is "
                  "assets/tokenizer/tokenizer.json, rebuilt by scripts/train_tokenizer.py)")
        self.path: Path = resolved
        try:
            self._tokenizer = HFTokenizer.from_file(str(resolved))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise ValueError(f"--model.tokenizer_path {str(path)!r}: not a valid Hugging Face "
                             f"tokenizer.json ({e})") from e
        self.bos_id: int = self._special_id(BOS_TOKEN)
        self.eos_id: int = self._special_id(EOS_TOKEN)

    def _special_id(self, token: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise ValueError(f"--model.tokenizer_path {str(self.path)!r}: the vocabulary has no {token} token")
        return token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: the model's embedding rows."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, bos: bool = True, eos: bool = True) -> list[int]:
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return self._add_specials(ids, bos, eos)

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = True) -> list[list[int]]:
        """``encode`` for many texts at once, spread over the tokenizers thread pool."""
        # encode_batch_fast skips character offsets, which cairn never uses.
        encode = getattr(self._tokenizer, "encode_batch_fast", self._tokenizer.encode_batch)
        encodings = encode(texts, add_special_tokens=False)
        return [self._add_specials(encoding.ids, bos, eos) for encoding in encodings]

    def _add_specials(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of a list of ids (or a 1-D tensor/array of them)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
