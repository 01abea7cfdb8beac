"""Data: the tokenizer, text sources (bundled corpus, txt/jsonl/parquet) and the stateful,
data-parallel loader of packed sequences."""

from cairn.data.dataloader import StatefulDataLoader, build_dataloader
from cairn.data.tokenizer import Tokenizer

__all__ = ["StatefulDataLoader", "Tokenizer", "build_dataloader"]
