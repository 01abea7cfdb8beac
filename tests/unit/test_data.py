"""The data path: tokenizer, bundled corpus, sources, and the loader's order contract."""

from __future__ import annotations

import gzip
import io
import json
import logging
import time

import numpy as np
import pytest
import torch

from cairn.config.job_config import DataloaderSection
from cairn.data.dataloader import build_dataloader, epoch_order
from cairn.data.datasets import BUNDLED_CORPUS, load_token_stream
from cairn.data.paths import REPO_ROOT
from cairn.data.tokenizer import Tokenizer

TOKENIZER_PATH = "assets/tokenizer/tokenizer.json"
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly "
         "judge boxing matches near the old river bank").split()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    # One cache for the whole module: the bundled corpus is tokenized once, never in ~/.cache.
    monkeypatch.setenv("CAIRN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cairn-cache"))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer(TOKENIZER_PATH)


def _documents(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"Document {i}. " + " ".join(rng.choice(WORDS, size=int(rng.integers(20, 60)))) + "."
            for i in range(count)]


@pytest.fixture
def small_jsonl(tmp_path):
    """~40 sequences of 16+1 tokens: small enough to cross epochs in a few steps."""
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(_documents(6))))
    return path


def _loader(tokenizer, dataset="bundled", *, local=8, global_batch=-1, rank=0, degree=1, seed=0,
            shuffle=True, seq_len=16, text_field="text"):
    config = DataloaderSection(dataset=str(dataset), text_field=text_field, shuffle=shuffle)
    return build_dataloader(config, tokenizer, seq_len=seq_len, local_batch_size=local,
                            global_batch_size=global_batch, dp_rank=rank, dp_degree=degree, seed=seed)


def _global_batches(loaders, num_steps):
    """Per optimizer step, the rows of every micro-step of every rank, in (micro, rank) order."""
    steps = []
    for _ in range(num_steps):
        rows = []
        for _ in range(loaders[0].grad_accum_steps):
            for loader in loaders:
                inputs, labels = loader.next_batch()
                rows.append(torch.cat([inputs, labels[:, -1:]], dim=1))
        steps.append(torch.cat(rows))
    return steps


# --- tokenizer ---------------------------------------------------------------------------

def test_tokenizer_round_trip(tokenizer):
    text = "Return the number of items in a container.\n\n  Naïve café — 日本語 ✓ \t"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id and ids[-1] == tokenizer.eos_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer.encode(text, bos=False, eos=False)) == text
    assert tokenizer.decode(torch.tensor(ids[1:-1])) == text
    assert tokenizer.encode("", bos=True, eos=False) == [tokenizer.bos_id]
    assert tokenizer.encode_batch([text, "x"], bos=False, eos=True) == [
        tokenizer.encode(text, bos=False), tokenizer.encode("x", bos=False)]


def test_bundled_tokenizer_ids_and_hf_config(tokenizer):
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (2048, 0, 1)
    assert tokenizer.path == (REPO_ROOT / TOKENIZER_PATH).resolve()
    config = json.loads((REPO_ROOT / "assets/tokenizer/tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|begin_of_text|>", "<|end_of_text|>")
    # English compresses: the tokenizer learnt words, not just bytes.
    assert len(tokenizer.encode("Return a new dictionary initialized from the mapping.", False, False)) <= 12


def test_tokenizer_path_resolves_against_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Tokenizer(TOKENIZER_PATH).vocab_size == 2048
    with pytest.raises(FileNotFoundError, match="--model.tokenizer_path"):
        Tokenizer("no/such/tokenizer.json")


# --- bundled corpus ------------------------------------------------------------------------

def test_bundled_corpus_present_and_small():
    assert BUNDLED_CORPUS.is_file() and BUNDLED_CORPUS.stat().st_size < 3_000_000
    assert (BUNDLED_CORPUS.parent / "ORIGIN.md").is_file()
    with gzip.open(BUNDLED_CORPUS, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    assert len(texts) > 300
    words = " ".join(texts).split()
    assert len(words) > 200_000 and words.count("the") > 0.02 * len(words)  # English prose


def test_bundled_loader_builds_fast(tokenizer):
    start = time.perf_counter()
    loader = _loader(tokenizer, seq_len=128)
    assert time.perf_counter() - start < 10
    assert loader.num_sequences > 4000
    inputs, labels = loader.next_batch()
    assert inputs.shape == labels.shape == (8, 128) and inputs.dtype == labels.dtype == torch.long
    assert torch.equal(inputs[:, 1:], labels[:, :-1])
    assert int(inputs.max()) < tokenizer.vocab_size


# --- order contract ------------------------------------------------------------------------

def test_loader_is_deterministic(tokenizer):
    a, b, c = (_loader(tokenizer, seed=s) for s in (3, 3, 4))
    for _ in range(3):
        batch_a, batch_b, batch_c = a.next_batch(), b.next_batch(), c.next_batch()
        assert all(torch.equal(x, y) for x, y in zip(batch_a, batch_b))
        assert not torch.equal(batch_a[0], batch_c[0])


def test_unshuffled_order_is_the_token_stream(tokenizer, small_jsonl):
    loader = _loader(tokenizer, small_jsonl, local=2, shuffle=False, seq_len=16)
    tokens = load_token_stream(str(small_jsonl), "text", tokenizer).tokens
    inputs, labels = loader.next_batch()
    assert inputs[1].tolist() == tokens[17:33].tolist() and labels[1].tolist() == tokens[18:34].tolist()


def test_epochs_are_permutations(tokenizer, small_jsonl):
    loader = _loader(tokenizer, small_jsonl, local=2)
    n = loader.num_sequences
    first, second = loader.sequence_indices(0, n), loader.sequence_indices(n, n)
    assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(n))
    assert first.tolist() != second.tolist()
    assert np.array_equal(first, epoch_order(n, 0, 0, shuffle=True))


@pytest.mark.parametrize("num_ranks,local", [(4, 2), (2, 4), (8, 1)])
def test_same_global_batch_whatever_the_dp_layout(tokenizer, small_jsonl, num_ranks, local):
    # 6 steps of 8 cross the ~40-sequence epoch boundary mid-batch.
    single = _global_batches([_loader(tokenizer, small_jsonl, local=8, seed=1)], 6)
    ranks = [_loader(tokenizer, small_jsonl, local=local, rank=r, degree=num_ranks, seed=1)
             for r in range(num_ranks)]
    assert ranks[0].num_sequences < 6 * 8
    for one, many in zip(single, _global_batches(ranks, 6)):
        assert torch.equal(one, many)
    assert {r.position for r in ranks} == {48}


def test_grad_accumulation_order(tokenizer, small_jsonl):
    reference = _loader(tokenizer, small_jsonl, local=16, seed=2)
    ranks = [_loader(tokenizer, small_jsonl, local=2, global_batch=16, rank=r, degree=2, seed=2) for r in range(2)]
    assert ranks[0].grad_accum_steps == 4 and reference.grad_accum_steps == 1
    for one, many in zip(_global_batches([reference], 3), _global_batches(ranks, 3)):
        assert torch.equal(one, many)
    # Micro-step m of rank r holds positions [s*G + m*L*D + r*L, +L).
    probe = _loader(tokenizer, small_jsonl, local=2, global_batch=16, rank=1, degree=2, seed=2)
    for micro_step in range(4):
        expected = probe.sequence_indices(micro_step * 4 + 2, 2)
        inputs, _ = probe.next_batch()
        assert torch.equal(inputs, probe._sequences.rows(expected)[:, :-1])


@pytest.mark.parametrize("consumed_steps", [1, 5])  # 5 x 8 crosses the first epoch boundary
def test_resume_gives_the_exact_next_batches(tokenizer, small_jsonl, consumed_steps):
    uninterrupted = _loader(tokenizer, small_jsonl, local=4, global_batch=8, seed=5)
    for _ in range(consumed_steps * 2):
        uninterrupted.next_batch()
    buffer = io.BytesIO()
    torch.save(uninterrupted.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert all(isinstance(v, (int, str)) for v in state.values())

    # Resume on another layout with the same global batch: 4 ranks of 2.
    resumed = [_loader(tokenizer, small_jsonl, local=2, rank=r, degree=4, seed=5) for r in range(4)]
    for loader in resumed:
        loader.load_state_dict(state)
        assert loader.state_dict() == state
    for one, many in zip(_global_batches([uninterrupted], 6), _global_batches(resumed, 6)):
        assert torch.equal(one, many)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_round_trip_of_the_loader(tokenizer, small_jsonl, tmp_path):
    import torch.distributed.checkpoint as dcp

    saved = _loader(tokenizer, small_jsonl, local=4, seed=7)
    for _ in range(3):
        saved.next_batch()
    dcp.save({"dataloader": saved}, checkpoint_id=tmp_path / "step-3")
    loaded = _loader(tokenizer, small_jsonl, local=4, seed=7)
    dcp.load({"dataloader": loaded}, checkpoint_id=tmp_path / "step-3")
    assert loaded.position == 12
    assert all(torch.equal(x, y) for x, y in zip(saved.next_batch(), loaded.next_batch()))


def test_state_dict_is_identical_on_every_rank(tokenizer, small_jsonl):
    ranks = [_loader(tokenizer, small_jsonl, local=2, global_batch=8, rank=r, degree=2) for r in range(2)]
    _global_batches(ranks, 3)
    assert ranks[0].state_dict() == ranks[1].state_dict()
    assert ranks[0].state_dict()["position"] == 24


# --- sources ---------------------------------------------------------------------------------

def _expected_stream(tokenizer, texts):
    return [t for text in texts for t in tokenizer.encode(text)]


def test_jsonl_and_gzip_sources(tokenizer, tmp_path):
    texts = _documents(5)
    plain, packed = tmp_path / "d.jsonl", tmp_path / "d.jsonl.gz"
    lines = "".join(json.dumps({"content": t}) + "\n" + "\n" for t in texts)  # blank lines are skipped
    plain.write_text(lines)
    packed.write_bytes(gzip.compress(lines.encode()))
    for path in (plain, packed):
        stream = load_token_stream(str(path), "content", tokenizer)
        assert stream.tokens.tolist() == _expected_stream(tokenizer, texts) and stream.num_documents == 5
    assert load_token_stream(str(plain), "content", tokenizer).fingerprint == stream.fingerprint


def test_parquet_source(tokenizer, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = _documents(6)
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": texts + [None], "n": list(range(7))}), path, row_group_size=4)
    stream = load_token_stream(str(path), "body", tokenizer)
    assert stream.tokens.tolist() == _expected_stream(tokenizer, texts) and stream.num_documents == 6


def test_txt_and_folder_sources(tokenizer, tmp_path):
    texts = _documents(4)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "2.txt").write_text(texts[2])
    (tmp_path / "a.txt").write_text(texts[0] + "\n\n" + texts[1])  # a .txt file is one document
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": texts[3]}) + "\n")
    (tmp_path / "README.md").write_text("not data")
    (tmp_path / ".hidden.txt").write_text("not data either")
    single = load_token_stream(str(tmp_path / "a.txt"), "text", tokenizer)
    assert single.tokens.tolist() == _expected_stream(tokenizer, [texts[0] + "\n\n" + texts[1]])
    folder = load_token_stream(str(tmp_path), "text", tokenizer)
    expected = _expected_stream(tokenizer, [texts[0] + "\n\n" + texts[1], texts[2], texts[3]])
    assert folder.tokens.tolist() == expected and folder.num_documents == 3


def test_cache_is_reused_and_invalidated(tokenizer, tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("first version of the text")
    first = load_token_stream(str(path), "text", tokenizer, cache_dir=tmp_path / "cache")
    again = load_token_stream(str(path), "text", tokenizer, cache_dir=tmp_path / "cache")
    assert isinstance(again.tokens, np.memmap) and again.fingerprint == first.fingerprint
    path.write_text("a second, longer version of the text")
    changed = load_token_stream(str(path), "text", tokenizer, cache_dir=tmp_path / "cache")
    assert changed.tokens.tolist() == tokenizer.encode("a second, longer version of the text")


# --- errors -------------------------------------------------------------------------------

def test_source_errors_name_the_flag(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="--dataloader.dataset"):
        _loader(tokenizer, tmp_path / "missing.jsonl")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="--dataloader.dataset.*unsupported"):
        _loader(tokenizer, tmp_path / "data.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="--dataloader.dataset"):
        _loader(tokenizer, tmp_path / "empty")
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match="--dataloader.text_field 'text'.*body"):
        _loader(tokenizer, tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="--training.seq_len"):
        _loader(tokenizer, tmp_path / "d.jsonl", text_field="body", seq_len=4096)


def test_parquet_missing_column_names_the_flag(tokenizer, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"body": ["hello"], "n": [1]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="--dataloader.text_field 'text'.*body"):
        _loader(tokenizer, tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="--dataloader.text_field 'n'.*not text"):
        _loader(tokenizer, tmp_path / "d.parquet", text_field="n")


def test_batch_layout_errors_name_the_flags(tokenizer):
    with pytest.raises(ValueError) as error:
        _loader(tokenizer, local=4, global_batch=12, degree=2)
    for name in ("--training.global_batch_size", "--training.local_batch_size", "dp) degree 2"):
        assert name in str(error.value)


def test_resume_mismatch_errors(tokenizer, small_jsonl, caplog):
    state = _loader(tokenizer, small_jsonl, local=4).state_dict()
    with pytest.raises(ValueError) as error:
        _loader(tokenizer, small_jsonl, local=8).load_state_dict(state)
    assert "--training.global_batch_size" in str(error.value)
    assert "--checkpoint.exclude_from_loading dataloader" in str(error.value)
    with pytest.raises(ValueError, match="--training.seq_len"):
        _loader(tokenizer, small_jsonl, local=4, seq_len=8).load_state_dict(state)

    other = _loader(tokenizer, local=4)  # the bundled corpus: another fingerprint
    with caplog.at_level(logging.WARNING, logger="cairn.data.dataloader"):
        other.load_state_dict({**state, "position": 12})
    assert other.position == 12 and "differs" in caplog.text
