"""Train cairn's small byte-level BPE tokenizer on the bundled corpus.

    python scripts/train_tokenizer.py        # writes assets/tokenizer/tokenizer.json
                                             # and tokenizer_config.json

Byte-level, so any text encodes without unknown tokens. Two special tokens take ids 0
and 1: ``<|begin_of_text|>`` and ``<|end_of_text|>`` (Llama 3's names). Like Llama 3's
``tokenizer.json``, the post-processor prepends ``<|begin_of_text|>`` when a caller asks
for special tokens, so a Hugging Face export that copies these two files behaves like
a Llama 3 tokenizer under ``AutoTokenizer``. Training is deterministic: the same corpus
gives the same file.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
from pathlib import Path
from typing import Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO_ROOT / "assets" / "corpus" / "corpus.jsonl.gz"
DEFAULT_OUTPUT_DIR = REPO_ROOT / "assets" / "tokenizer"
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
VOCAB_SIZE = 2048
# The debug model's max_seq_len: written as model_max_length for HF exports.
MODEL_MAX_LENGTH = 2048


def corpus_texts(corpus: Path) -> Iterator[str]:
    with gzip.open(corpus, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)["text"]


def train(corpus: Path, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus_texts(corpus), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)])
    return tokenizer


def tokenizer_config() -> dict:
    """What HF ``AutoTokenizer`` needs beside tokenizer.json (bos/eos named, no pad)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "model_max_length": MODEL_MAX_LENGTH,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args()
    if not args.corpus.is_file():
        parser.error(f"--corpus {args.corpus}: no such file (run scripts/make_corpus.py first)")

    tokenizer = train(args.corpus, args.vocab_size)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_file = args.output_dir / "tokenizer.json"
    tokenizer.save(str(tokenizer_file), pretty=True)
    config_file = args.output_dir / "tokenizer_config.json"
    config_file.write_text(json.dumps(tokenizer_config(), indent=2) + "\n", encoding="utf-8")
    digest = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    print(f"wrote {tokenizer_file} (vocab {tokenizer.get_vocab_size()}, {BOS}={tokenizer.token_to_id(BOS)}, "
          f"{EOS}={tokenizer.token_to_id(EOS)}, sha256 {digest}) and {config_file}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
