"""Hugging Face interop: conversions are exact, exports load in transformers, bad inputs are named.

A tiny random ``LlamaForCausalLM`` (built here, never downloaded) is the reference: cairn
must compute its logits from converted weights, transformers must compute cairn's from an
export, and HF -> DCP -> HF must give back every tensor bit for bit.
"""

from __future__ import annotations

import copy
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from cairn.checkpoint.convert import convert_dcp_to_hf, convert_hf_to_dcp
from cairn.checkpoint.hf import HFCheckpointError, load_hf, save_hf
from cairn.models.llama3 import Transformer, init_weights, llama3_flavors
from cairn.models.llama3.state_dict_adapter import (
    Llama3StateDictAdapter,
    half_split_to_interleaved,
    interleaved_to_half_split,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
from _launch import run_distributed  # noqa: E402

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[2]
TOKENIZER_DIR = REPO / "assets" / "tokenizer"
VOCAB = 256
ATOL = 1e-5


def _hf_config(tied: bool = False):
    return transformers.LlamaConfig(
        hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
        tie_word_embeddings=tied)


def _hf_model(tied: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(_hf_config(tied)).eval()
    if tied:  # a random lm_head would hide an untied load: make it the embedding for sure
        model.tie_weights()
    return model


def _save_hf_model(model, path: Path, dtype=torch.float32, shard: str | None = None) -> Path:
    model.to(dtype).save_pretrained(path, max_shard_size=shard or "5GB")
    model.float()
    return path


@pytest.fixture(scope="module")
def hf_untied(tmp_path_factory):
    model = _hf_model()
    return model, _save_hf_model(model, tmp_path_factory.mktemp("hf") / "untied")


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))


def _cairn_model(hf_dir: Path) -> Transformer:
    config = json.loads((hf_dir / "config.json").read_text())
    return Transformer(Llama3StateDictAdapter.from_hf_config(config)).eval()


def _logits(model, tokens) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return getattr(out, "logits", out)


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _safetensors_dtypes(hf_dir: Path) -> set[str]:
    from safetensors import safe_open

    dtypes = set()
    for path in hf_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return dtypes


# --- HF -> cairn ----------------------------------------------------------------------------


def test_convert_from_hf_script_gives_transformers_logits(hf_untied, tokens, tmp_path):
    hf_model, hf_dir = hf_untied
    out = tmp_path / "dcp"
    # The seed's command line, flavor inferred from config.json.
    result = subprocess.run([sys.executable, str(REPO / "scripts/checkpoint_conversion/convert_from_hf.py"),
                             str(hf_dir), str(out), "--model_name", "llama3", "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # Stock DCP: its metadata and one data file per tensor (tied weights under both names).
    model = _cairn_model(hf_dir)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([".metadata"] + [f"__0_{i}.distcp" for i in range(len(model.state_dict()))])

    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(out), no_dist=True)
    model.load_state_dict(state)
    assert (_logits(model, tokens) - _logits(hf_model, tokens)).abs().max().item() < ATOL


def test_load_hf_gives_transformers_logits(hf_untied, tokens):
    hf_model, hf_dir = hf_untied
    model = _cairn_model(hf_dir)
    stats = load_hf(model.state_dict(), hf_dir, Llama3StateDictAdapter(model.args))
    assert stats["tensors"] == len(model.state_dict())
    assert (_logits(model, tokens) - _logits(hf_model, tokens)).abs().max().item() < ATOL


def test_rotary_permutation_is_inverted_exactly():
    weight = torch.randn(4 * 16, 64)
    half_split = interleaved_to_half_split(weight, 4)
    assert not torch.equal(half_split, weight)
    assert torch.equal(half_split_to_interleaved(half_split, 4), weight)
    # Head 0's rows: interleaved pairs (0, 1), (2, 3), ... become the two halves 0..7 | 8..15.
    assert torch.equal(half_split[:8], weight[0:16:2]) and torch.equal(half_split[8:16], weight[1:16:2])


# --- cairn -> HF ----------------------------------------------------------------------------


def _random_cairn_model(hf_dir_for_args: Path, seed: int = 3) -> Transformer:
    model = _cairn_model(hf_dir_for_args)
    init_weights(model, seed=seed, device="cpu")
    return model.eval()


def test_save_hf_loads_in_transformers_with_same_logits(hf_untied, tokens, tmp_path):
    model = _random_cairn_model(hf_untied[1])
    out = tmp_path / "export"
    save_hf(model.state_dict(), out, Llama3StateDictAdapter(model.args), dtype="float32",
            tokenizer_dir=TOKENIZER_DIR)
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no staging dir left behind
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (0, 1)  # from the bundled tokenizer
    exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert (_logits(exported, tokens) - _logits(model, tokens)).abs().max().item() < ATOL
    assert _safetensors_dtypes(out) == {"F32"}


def test_save_hf_bf16_is_bf16_everywhere(hf_untied, tokens, tmp_path):
    model = _random_cairn_model(hf_untied[1])
    out = tmp_path / "bf16"
    save_hf(model.state_dict(), out, Llama3StateDictAdapter(model.args), dtype=torch.bfloat16,
            max_shard_bytes=40_000)
    assert _safetensors_dtypes(out) == {"BF16"}
    assert (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = _logits(model.to(torch.bfloat16).float(), tokens)  # the same weights, rounded to bf16
    assert (_logits(exported, tokens) - expected).abs().max().item() < ATOL


# --- round trips ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_hf_dcp_hf_round_trip_is_bitwise(dtype, sharded, tmp_path):
    source = _save_hf_model(_hf_model(seed=5), tmp_path / "source", dtype, shard="100KB" if sharded else None)
    assert (source / "model.safetensors.index.json").is_file() == sharded
    convert_hf_to_dcp(source, tmp_path / "dcp", progress=False)
    convert_dcp_to_hf(tmp_path / "dcp", tmp_path / "back", hf_assets_path=source,
                      export_dtype=dtype, max_shard_bytes=100_000 if sharded else 10**9, progress=False)
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file() == sharded
    before, after = _tensors(source), _tensors(tmp_path / "back")
    assert sorted(before) == sorted(after)
    for key in before:
        assert before[key].dtype == after[key].dtype == dtype, key
        assert torch.equal(before[key], after[key]), key


def test_conversions_hold_one_source_tensor_at_a_time(hf_untied, tmp_path, monkeypatch):
    """Streaming: when a tensor is read, the memory of every tensor read before it is freed
    (but the one just before, which DCP's writer still holds while it asks for the next)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    import cairn.checkpoint.convert as convert
    from cairn.checkpoint.hf import HFWeights

    alive_at_read: list[int] = []

    def tracking(read):
        earlier: list[StorageWeakRef] = []

        def wrapped(*args, **kwargs):
            alive_at_read.append(sum(not ref.expired() for ref in earlier))
            tensor = read(*args, **kwargs)
            earlier.append(StorageWeakRef(tensor.untyped_storage()))
            return tensor
        return wrapped

    monkeypatch.setattr(HFWeights, "read", tracking(HFWeights.read))
    monkeypatch.setattr(convert, "_read_dcp_tensor", tracking(convert._read_dcp_tensor))
    convert_hf_to_dcp(hf_untied[1], tmp_path / "dcp", progress=False)
    convert_dcp_to_hf(tmp_path / "dcp", tmp_path / "hf", hf_assets_path=hf_untied[1], progress=False)
    num_tensors = len(_cairn_model(hf_untied[1]).state_dict())
    assert len(alive_at_read) == 2 * num_tensors and max(alive_at_read) <= 1


def test_short_script_paths_work(hf_untied, tmp_path, monkeypatch, capsys):
    """``python scripts/convert_{from,to}_hf.py`` (seed 000's example) run the same scripts."""
    hf_dir = hf_untied[1]
    for script, argv in [
        ("convert_from_hf.py", [str(hf_dir), str(tmp_path / "dcp"), "--model_name", "llama3", "--quiet"]),
        ("convert_to_hf.py", [str(tmp_path / "dcp"), str(tmp_path / "hf"), "--hf_assets_path", str(hf_dir),
                              "--model_name", "llama3", "--export_dtype", "bfloat16", "--quiet"]),
    ]:
        monkeypatch.setattr(sys, "argv", [script, *argv])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO / "scripts" / script), run_name="__main__")
        assert exit_info.value.code == 0, capsys.readouterr().err
    assert _safetensors_dtypes(tmp_path / "hf") == {"BF16"}
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")


def test_convert_to_hf_of_a_training_checkpoint(tokens, tmp_path):
    """A full checkpoint (optimizer state beside the model) of a debugmodel whose vocabulary
    the trainer sized from its tokenizer: only the model is exported, with that vocabulary."""
    args = copy.deepcopy(llama3_flavors["debugmodel"])
    args.vocab_size = 300
    model = Transformer(args).eval()
    init_weights(model, seed=11, device="cpu")
    # Optimizer state named like the model's tensors (as FQN-keyed optimizers save it).
    optimizer = {"state": {fqn: {"exp_avg": torch.ones_like(t)} for fqn, t in model.state_dict().items()},
                 "param_groups": [{"lr": 1e-3}]}
    state = {**model.state_dict(), "optimizer": optimizer, "train_state": {"step": 1}}
    dcp.save(state, checkpoint_id=str(tmp_path / "step-1"), no_dist=True)

    convert_dcp_to_hf(tmp_path / "step-1", tmp_path / "hf", flavor="debugmodel", hf_assets_path=TOKENIZER_DIR,
                      progress=False)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 300
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (_logits(exported, tokens) - _logits(model, tokens)).abs().max().item() < ATOL


# --- tied embeddings (Llama 3.2 1B/3B style) ------------------------------------------------


def test_tied_embeddings_both_ways(tokens, tmp_path):
    hf_model = _hf_model(tied=True, seed=7)
    hf_dir = _save_hf_model(hf_model, tmp_path / "tied")
    assert "lm_head.weight" not in _tensors(hf_dir)

    convert_hf_to_dcp(hf_dir, tmp_path / "dcp", progress=False)
    model = _cairn_model(hf_dir)
    assert model.args.tie_word_embeddings and model.output.weight is model.tok_embeddings.weight
    state = model.state_dict()
    dcp.load(state, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    model.load_state_dict(state)
    assert (_logits(model, tokens) - _logits(hf_model, tokens)).abs().max().item() < ATOL

    save_hf(model.state_dict(), tmp_path / "export", Llama3StateDictAdapter(model.args), dtype="float32")
    assert "lm_head.weight" not in _tensors(tmp_path / "export")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert (_logits(exported, tokens) - _logits(model, tokens)).abs().max().item() < ATOL


@pytest.mark.parametrize("name", list(llama3_flavors))
def test_config_json_round_trip_matches_flavor(name):
    flavor = llama3_flavors[name]
    config = Llama3StateDictAdapter(flavor).to_hf_config("bfloat16")
    args = Llama3StateDictAdapter.from_hf_config(config)
    assert (args.dim, args.n_layers, args.n_heads, args.num_kv_heads, args.ffn_hidden_dim, args.vocab_size,
            args.tie_word_embeddings, args.rope_scaling) == \
        (flavor.dim, flavor.n_layers, flavor.n_heads, flavor.num_kv_heads, flavor.ffn_hidden_dim,
         flavor.vocab_size, flavor.tie_word_embeddings, flavor.rope_scaling)
    assert Llama3StateDictAdapter.match_flavor(config) == name
    assert transformers.LlamaConfig.from_dict(config).intermediate_size == flavor.ffn_hidden_dim


# --- bad inputs -----------------------------------------------------------------------------


def _copy_hf_dir(source: Path, target: Path) -> Path:
    target.mkdir()
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


def _expect_error(tmp_path: Path, hf_dir: Path, *fragments: str) -> None:
    """Both load paths refuse with a message holding every fragment; the output dir never appears."""
    out = tmp_path / "out"
    with pytest.raises(HFCheckpointError) as error:
        convert_hf_to_dcp(hf_dir, out, progress=False)
    for fragment in fragments:
        assert fragment in str(error.value)
    assert not out.exists() and not list(tmp_path.glob(".out*"))
    model = Transformer(Llama3StateDictAdapter.from_hf_config(json.loads(_hf_config().to_json_string())))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(HFCheckpointError) as error:
        load_hf(model.state_dict(), hf_dir, Llama3StateDictAdapter(model.args))
    for fragment in fragments:
        assert fragment in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing was modified


def test_error_directory_without_safetensors(hf_untied, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((hf_untied[1] / "config.json").read_text())
    _expect_error(tmp_path, empty, str(empty), "model.safetensors")


def test_error_config_of_another_architecture(hf_untied, tmp_path):
    hf_dir = _copy_hf_dir(hf_untied[1], tmp_path / "mistral")
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (hf_dir / "config.json").write_text(json.dumps(config))
    _expect_error(tmp_path, hf_dir, str(hf_dir / "config.json"), "MistralForCausalLM")


def test_error_missing_key(hf_untied, tmp_path):
    from safetensors.torch import save_file

    hf_dir = _copy_hf_dir(hf_untied[1], tmp_path / "missing")
    tensors = _tensors(hf_dir)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, hf_dir / "model.safetensors", metadata={"format": "pt"})
    _expect_error(tmp_path, hf_dir, "missing 'model.layers.1.mlp.up_proj.weight'", "layers.1.feed_forward.w3")


def test_error_wrong_shapes_names_key_and_flavor(hf_untied, tmp_path):
    hf_dir = _copy_hf_dir(hf_untied[1], tmp_path / "no_config")
    (hf_dir / "config.json").unlink()
    with pytest.raises(HFCheckpointError) as error:
        convert_hf_to_dcp(hf_dir, tmp_path / "out", flavor="debugmodel", progress=False)
    message = str(error.value)
    assert "'model.layers.0.self_attn.q_proj.weight' in model.safetensors has shape (64, 64)" in message
    assert "--model_flavor debugmodel" in message and not (tmp_path / "out").exists()

    # With a config.json of another size, the message names the flavor it matches.
    (hf_dir / "config.json").write_text(json.dumps(Llama3StateDictAdapter(llama3_flavors["1B"]).to_hf_config()))
    _expect_error(tmp_path, hf_dir, str(hf_dir / "config.json"), "matches llama3 flavor '1B'")


@pytest.mark.parametrize("damage", ["truncated", "not_json", "missing_file"])
def test_error_bad_index(tmp_path, damage):
    source = _save_hf_model(_hf_model(), tmp_path / "source", shard="100KB")
    index_path = source / "model.safetensors.index.json"
    text = index_path.read_text()
    if damage == "truncated":
        index_path.write_text(text[: len(text) // 2])
    elif damage == "not_json":
        index_path.write_text('{"metadata": {}}')
    else:
        next(source.glob("model-00002-*.safetensors")).unlink()
    _expect_error(tmp_path, source, str(index_path))


def test_error_truncated_safetensors_names_file(hf_untied, tmp_path):
    hf_dir = _copy_hf_dir(hf_untied[1], tmp_path / "truncated")
    data = (hf_dir / "model.safetensors").read_bytes()
    (hf_dir / "model.safetensors").write_bytes(data[: len(data) - 1000])
    _expect_error(tmp_path, hf_dir, str(hf_dir / "model.safetensors"))


def test_existing_output_is_never_touched(hf_untied, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(HFCheckpointError, match="not empty"):
        convert_hf_to_dcp(hf_untied[1], out, progress=False)
    model = _random_cairn_model(hf_untied[1])
    with pytest.raises(HFCheckpointError, match=str(out)):
        save_hf(model.state_dict(), out, Llama3StateDictAdapter(model.args), dtype="float32")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_failure_mid_write_leaves_nothing(hf_untied, tmp_path, monkeypatch):
    """A failure after some tensors were written (a disk error, say) leaves no output and no staging."""
    from cairn.checkpoint.hf import HFExportWriter, HFWeights

    def failing_after(method, calls: int):
        count = [0]

        def wrapped(*args, **kwargs):
            count[0] += 1
            if count[0] > calls:
                raise OSError(28, "No space left on device")
            return method(*args, **kwargs)
        return wrapped

    with monkeypatch.context() as patch:
        patch.setattr(HFWeights, "read", failing_after(HFWeights.read, 5))
        with pytest.raises(OSError):
            convert_hf_to_dcp(hf_untied[1], tmp_path / "dcp", progress=False)
    model = _random_cairn_model(hf_untied[1])
    monkeypatch.setattr(HFExportWriter, "write", failing_after(HFExportWriter.write, 5))
    with pytest.raises(OSError):
        save_hf(model.state_dict(), tmp_path / "export", Llama3StateDictAdapter(model.args), dtype="float32")
    assert list(tmp_path.iterdir()) == []


def test_convert_to_hf_rejects_non_dcp_dir(hf_untied, tmp_path):
    with pytest.raises(HFCheckpointError, match=r"\.metadata.*convert_from_hf"):
        convert_dcp_to_hf(hf_untied[1], tmp_path / "out", flavor="debugmodel", progress=False)
    assert not (tmp_path / "out").exists()


def test_convert_to_hf_names_flavor_mismatch(hf_untied, tmp_path):
    convert_hf_to_dcp(hf_untied[1], tmp_path / "dcp", progress=False)
    wq_mismatch = r"(?s)--model_flavor debugmodel.*'layers\.0\.attention\.wq\.weight': checkpoint shape"
    with pytest.raises(HFCheckpointError, match=wq_mismatch):
        convert_dcp_to_hf(tmp_path / "dcp", tmp_path / "out", flavor="debugmodel", progress=False)
    assert not (tmp_path / "out").exists()


# --- sharded loads and saves on 2 gloo ranks ------------------------------------------------


def _two_rank_worker(rank: int, world_size: int, hf_dir: str, out_dir: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    model = _cairn_model(hf_dir)
    adapter = Llama3StateDictAdapter(model.args)
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.layers.values():
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    load_hf(model.state_dict(), hf_dir, adapter)
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    save_hf(model.state_dict(), out_dir / "fsdp", adapter, dtype="float32", max_shard_bytes=100_000)

    # Pipeline-style: each rank holds a different subset of plain tensors.
    keys = sorted(full)
    first_stage = {k for k in keys if k.startswith(("tok_embeddings", "layers.0."))}
    mine = {k: torch.zeros_like(full[k]) for k in keys if (k in first_stage) == (rank == 0)}
    load_hf(mine, hf_dir, adapter)
    save_hf(mine, out_dir / "stages", adapter, dtype="float32")

    # Rank 0's errors reach every rank, before the gathers or after a failed write; none hangs.
    errors = []
    if rank == 0:
        (out_dir / "taken").mkdir()
        (out_dir / "taken" / "file").write_text("x")
    try:
        save_hf(model.state_dict(), out_dir / "taken", adapter, dtype="float32")
    except HFCheckpointError as e:
        errors.append(str(e))
    if rank == 0:
        from cairn.checkpoint.hf import HFExportWriter

        write, calls = HFExportWriter.write, []

        def failing_write(self, fqn, tensor):
            calls.append(fqn)
            if len(calls) > 3:
                raise OSError(28, "No space left on device")
            write(self, fqn, tensor)
        HFExportWriter.write = failing_write
    try:
        save_hf(model.state_dict(), out_dir / "failed", adapter, dtype="float32")
    except (HFCheckpointError, OSError) as e:
        errors.append(str(e))
    result = {"stage": mine, "errors": errors}
    return {**result, "full": full} if rank == 0 else result


def test_two_rank_sharded_load_and_save_match_single_process(hf_untied, tmp_path):
    hf_dir = hf_untied[1]
    single = _cairn_model(hf_dir)
    load_hf(single.state_dict(), hf_dir, Llama3StateDictAdapter(single.args))
    expected = single.state_dict()

    results = run_distributed(_two_rank_worker, 2, str(hf_dir), str(tmp_path), timeout_s=180)
    assert sorted(results[0]["full"]) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(results[0]["full"][key], tensor), key
    stages = {**results[0]["stage"], **results[1]["stage"]}
    assert sorted(stages) == sorted(expected) and all(torch.equal(stages[k], expected[k]) for k in expected)

    for rank_result in results:
        assert len(rank_result["errors"]) == 2, rank_result["errors"]
        assert "not empty" in rank_result["errors"][0] and "No space left" in rank_result["errors"][1]
    assert not (tmp_path / "failed").exists() and not list(tmp_path.glob(".failed*"))
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["file"]

    reference = tmp_path / "single"
    save_hf(expected, reference, Llama3StateDictAdapter(single.args), dtype="float32")
    want = _tensors(reference)
    for layout in ("fsdp", "stages"):
        got = _tensors(tmp_path / layout)
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want), layout
