"""Text sources -> one token stream, cached.

``--dataloader.dataset`` is ``bundled`` (assets/corpus, no network) or a path to a file or
a folder of files:

- ``.txt`` / ``.txt.gz``: the whole file is one document;
- ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, text under ``--dataloader.text_field``;
- ``.parquet``: the ``--dataloader.text_field`` column (pyarrow, imported only here);
- a folder: every such file below it, in sorted path order (hidden entries and other
  files are skipped).

Every document is tokenized as ``[bos] + text + [eos]`` and the documents are concatenated
in source order into one uint32 stream. The stream is cached under ``$CAIRN_CACHE_DIR``
(default ``~/.cache/cairn``), keyed by the files' paths, sizes and mtimes, the tokenizer
file's hash and the text field, so a second run skips tokenization. (The bundled corpus
always reads its own ``text`` field, whatever ``--dataloader.text_field`` says.)
"""

from __future__ import annotations

import gzip
import hashlib
import io
import itertools
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from cairn.data.paths import REPO_ROOT, not_found_message, resolve_path
from cairn.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

BUNDLED = "bundled"
BUNDLED_CORPUS = REPO_ROOT / "assets" / "corpus" / "corpus.jsonl.gz"
BUNDLED_TEXT_FIELD = "text"
SUFFIXES = {".txt": "txt", ".txt.gz": "txt", ".jsonl": "jsonl", ".jsonl.gz": "jsonl", ".parquet": "parquet"}
TOKEN_DTYPE = np.uint32
# Bump when the stream layout changes so that old caches are not reused.
_CACHE_VERSION = 1
# Texts handed to the tokenizer at once: enough for its thread pool, bounded memory.
_ENCODE_BATCH_CHARS = 4_000_000


@dataclass(frozen=True)
class TokenStream:
    """Every document of a dataset as ``[bos, ..., eos]``, concatenated."""

    tokens: np.ndarray
    """1-D uint32 (may be a read-only memory map of the cache file)."""
    num_documents: int
    fingerprint: str
    """Hash of the tokens themselves: equal streams are equal wherever they were built."""
    name: str
    """What the user asked for (``bundled`` or the path as given)."""


def data_format(path: Path) -> str | None:
    """``txt``, ``jsonl``, ``parquet``, or None for an unsupported file name."""
    name = path.name.lower()
    for suffix, fmt in SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    return None


def dataset_files(dataset: str) -> list[Path]:
    """The files ``--dataloader.dataset`` names, in the order their documents are read."""
    if dataset == BUNDLED:
        if not BUNDLED_CORPUS.is_file():
            raise FileNotFoundError(f"--dataloader.dataset bundled: {BUNDLED_CORPUS} is missing "
                                    "(regenerate it with scripts/make_corpus.py)")
        return [BUNDLED_CORPUS]
    root = resolve_path(dataset)
    supported = ", ".join(SUFFIXES)
    if root is None:
        raise FileNotFoundError(not_found_message("--dataloader.dataset", dataset)
                                + f"; give `bundled` or a {supported} file or a folder of them")
    if root.is_file():
        if data_format(root) is None:
            raise ValueError(f"--dataloader.dataset {dataset!r}: unsupported file type "
                             f"{''.join(root.suffixes) or '(no extension)'}; supported: {supported}")
        return [root]
    files = sorted((p for p in root.rglob("*") if p.is_file() and data_format(p) is not None
                    and not any(part.startswith(".") for part in p.relative_to(root).parts)),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise ValueError(f"--dataloader.dataset {dataset!r}: the folder holds no {supported} files")
    return files


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _txt_documents(path: Path) -> Iterator[str]:
    with _open_text(path) as f:
        yield f.read()


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with _open_text(path) as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--dataloader.dataset: {path}:{line_number} is not valid JSON ({e})") from e
            if not isinstance(record, dict) or text_field not in record:
                keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"--dataloader.text_field {text_field!r}: no such field in {path}:{line_number} "
                                 f"(it has: {keys})")
            text = record[text_field]
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(f"--dataloader.text_field {text_field!r}: {path}:{line_number} holds a "
                                 f"{type(text).__name__}, not text")
            yield text


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"--dataloader.dataset {path}: reading .parquet needs pyarrow "
                          "(pip install pyarrow, or cairn[data])") from e
    parquet = pq.ParquetFile(path)
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise ValueError(f"--dataloader.text_field {text_field!r}: no such column in {path} "
                         f"(it has: {', '.join(columns)})")
    for group in range(parquet.num_row_groups):
        for text in parquet.read_row_group(group, columns=[text_field]).column(0).to_pylist():
            if text is None:
                continue
            if not isinstance(text, str):
                raise ValueError(f"--dataloader.text_field {text_field!r}: the column of {path} holds "
                                 f"{type(text).__name__} values, not text")
            yield text


def iter_documents(path: Path, text_field: str) -> Iterator[str]:
    """The non-empty texts of one file, in file order."""
    readers = {"txt": lambda: _txt_documents(path), "jsonl": lambda: _jsonl_documents(path, text_field),
               "parquet": lambda: _parquet_documents(path, text_field)}
    try:
        for text in readers[data_format(path)]():
            if text:
                yield text
    except UnicodeDecodeError as e:
        raise ValueError(f"--dataloader.dataset: {path} is not UTF-8 text ({e})") from e


def tokenize_documents(texts: Iterable[str], tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """(the concatenated ``[bos] + ids + [eos]`` of every text, number of texts)."""
    chunks: list[np.ndarray] = []
    num_documents = 0
    batch: list[str] = []
    batch_chars = 0

    def flush() -> None:
        encoded = tokenizer.encode_batch(batch, bos=True, eos=True)
        total = sum(len(ids) for ids in encoded)
        chunks.append(np.fromiter(itertools.chain.from_iterable(encoded), dtype=TOKEN_DTYPE, count=total))
        batch.clear()

    for text in texts:
        batch.append(text)
        batch_chars += len(text)
        num_documents += 1
        if batch_chars >= _ENCODE_BATCH_CHARS:
            flush()
            batch_chars = 0
    if batch:
        flush()
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=TOKEN_DTYPE)
    return tokens, num_documents


def token_fingerprint(tokens: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(tokens, dtype="<u4").data, digest_size=16).hexdigest()


def default_cache_dir() -> Path:
    if os.environ.get("CAIRN_CACHE_DIR"):
        return Path(os.environ["CAIRN_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "cairn"


def _cache_key(files: list[Path], tokenizer: Tokenizer, text_field: str) -> str:
    identity = {
        "version": _CACHE_VERSION,
        "files": [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files],
        "tokenizer": hashlib.sha256(tokenizer.path.read_bytes()).hexdigest(),
        "bos_eos": [tokenizer.bos_id, tokenizer.eos_id],
        "text_field": text_field,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


def _read_cache(tokens_file: Path) -> tuple[np.ndarray, dict] | None:
    meta_file = tokens_file.with_suffix(".json")
    try:
        meta = json.loads(meta_file.read_text())
        tokens = np.load(tokens_file, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    if tokens.ndim != 1 or tokens.dtype != TOKEN_DTYPE or meta.get("num_tokens") != len(tokens):
        return None
    return tokens, meta


def _write_cache(tokens_file: Path, tokens: np.ndarray, meta: dict) -> None:
    """Atomic (temp file + rename): ranks that tokenize at once never see half a file."""
    try:
        tokens_file.parent.mkdir(parents=True, exist_ok=True)
        for target, write in ((tokens_file, lambda f: np.save(f, tokens, allow_pickle=False)),
                              (tokens_file.with_suffix(".json"), lambda f: f.write(json.dumps(meta).encode()))):
            fd, tmp = tempfile.mkstemp(dir=tokens_file.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, target)
    except OSError as e:  # a read-only home must not stop training: tokenizing again is cheap
        logger.warning("could not cache tokenized data in %s (%s); set CAIRN_CACHE_DIR to cache it",
                       tokens_file.parent, e)


def load_token_stream(dataset: str, text_field: str, tokenizer: Tokenizer, *,
                      cache_dir: str | Path | None = None) -> TokenStream:
    """Tokenize ``dataset`` (or reuse the cache): see the module docstring."""
    files = dataset_files(dataset)
    if dataset == BUNDLED:
        text_field = BUNDLED_TEXT_FIELD
    tokens_file = Path(cache_dir or default_cache_dir()) / "tokens" / f"{_cache_key(files, tokenizer, text_field)}.npy"
    cached = _read_cache(tokens_file)
    if cached is not None:
        tokens, meta = cached
        logger.debug("dataset %s: token cache hit %s", dataset, tokens_file)
        return TokenStream(tokens, meta["num_documents"], meta["fingerprint"], dataset)
    texts = itertools.chain.from_iterable(iter_documents(f, text_field) for f in files)
    tokens, num_documents = tokenize_documents(texts, tokenizer)
    if num_documents == 0:
        raise ValueError(f"--dataloader.dataset {dataset!r}: no text found"
                         + ("" if dataset == BUNDLED else f" (--dataloader.text_field {text_field!r})"))
    fingerprint = token_fingerprint(tokens)
    _write_cache(tokens_file, tokens, {"num_tokens": len(tokens), "num_documents": num_documents,
                                       "fingerprint": fingerprint, "dataset": dataset})
    return TokenStream(tokens, num_documents, fingerprint, dataset)
