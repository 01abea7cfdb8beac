"""Qwen3 dense and MoE on one process: shapes, Hugging Face both ways, expert-parallel errors, and
checkpoints that refuse to load with an expert tensor missing, zero-length or partly unwritten."""

from __future__ import annotations

import copy
import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cairn.checkpoint import CheckpointError, CheckpointManager, OptimizerState
from cairn.checkpoint.errors import HFCheckpointError
from cairn.checkpoint.hf import load_hf, save_hf
from cairn.config import parse_args
from cairn.config.manager import ConfigError, available_run_configs
from cairn.distributed.parallel_dims import ParallelDims
from cairn.models import get_model_spec
from cairn.models.common import init_weights
from cairn.models.qwen3.flavors import qwen3_flavors
from cairn.models.qwen3.model import Transformer
from cairn.models.qwen3.parallelize import model_problems
from cairn.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

sys.path.insert(0, str(Path(__file__).parent))
from s3_server import s3  # noqa: E402, F401 - a fixture
from test_storage import _resign_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# cairn's Qwen3 and transformers' compute the same functions in float32; they differ in the order
# of a few sums (RMSNorm, the experts' weighted sum): logits agree to ~1e-7.
LOGITS_ATOL = 1e-5

transformers = pytest.importorskip("transformers")


# --- shapes and configs ------------------------------------------------------------------------

@pytest.mark.parametrize("flavor,total,active", [
    ("0.6B", 0.596e9, None), ("1.7B", 1.72e9, None), ("4B", 4.02e9, None), ("8B", 8.19e9, None),
    ("14B", 14.77e9, None), ("32B", 32.76e9, None), ("30B-A3B", 30.53e9, 3.35e9), ("235B-A22B", 235.09e9, 22.19e9),
])
def test_flavors_have_the_published_sizes(flavor, total, active):
    args = qwen3_flavors[flavor]
    assert args.num_params() == pytest.approx(total, rel=2e-3)
    if active is not None:
        assert args.num_active_params() == pytest.approx(active, rel=2e-3)


def test_the_one_gpu_moe_fits_an_h200_with_fp32_adamw():
    args = qwen3_flavors["30B-A3B-L16-E64"]
    # weights, gradients and two moments in fp32: 16 bytes a parameter, under 100 GB of 141.
    assert 5e9 < args.num_params() and 16 * args.num_params() < 100e9
    assert args.moe.num_experts == 64 and args.n_layers == 16 and args.dim == qwen3_flavors["30B-A3B"].dim


def test_every_qwen3_run_config_parses_and_builds():
    spec = get_model_spec("qwen3")
    for name in available_run_configs("qwen3"):
        config = parse_args(["--module", "qwen3", "--config", name])
        assert config.model.name == "qwen3", name
        with torch.device("meta"):
            model = spec.model_cls(spec.flavors[config.model.flavor])
        assert (model.args.moe is not None) == bool(model.moe_layers()), name


def _tiny_moe_args():
    args = copy.deepcopy(qwen3_flavors["moe_debugmodel"])
    args.vocab_size, args.max_seq_len = 256, 16
    return args


# --- expert parallelism: impossible layouts are one error naming the flags -----------------------

def test_expert_parallel_degree_must_fit_the_ranks_it_borrows():
    with pytest.raises(ConfigError) as info:
        ParallelDims(dp_replicate=1, dp_shard=2, tp=1, pp=2, world_size=4, ep=4)
    assert "--parallelism.expert_parallel_degree (4) must divide --parallelism.data_parallel_shard_degree (2)" \
        in str(info.value)
    dims = ParallelDims(dp_replicate=1, dp_shard=2, tp=2, pp=1, world_size=4, ep=4)  # EP borrows TP ranks too
    assert dims.efsdp == 1 and dims.degrees["ep"] == 4
    assert "ep" not in ParallelDims(dp_replicate=1, dp_shard=4, tp=1, pp=1, world_size=4).degrees


def test_experts_must_divide_and_dense_models_refuse_expert_parallelism():
    job = parse_args(["--module", "qwen3", "--config", "qwen3_moe_debugmodel",
                      "--parallelism.expert_parallel_degree", "3"])
    with torch.device("meta"):
        moe, dense = Transformer(_tiny_moe_args()), Transformer(qwen3_flavors["debugmodel"])
    dims = ParallelDims(dp_replicate=1, dp_shard=3, tp=1, pp=1, world_size=3, ep=3)
    (problem,) = model_problems(moe, dims, job)
    assert "--parallelism.expert_parallel_degree (3) must divide the number of experts" in problem
    assert "(8)" in problem
    (problem,) = model_problems(dense, dims, job)
    assert "needs a mixture-of-experts model" in problem
    from cairn.models.llama3.model import Transformer as Llama, TransformerModelArgs
    from cairn.models.llama3.parallelize import model_problems as llama_problems

    with torch.device("meta"):
        llama = Llama(TransformerModelArgs(dim=64, n_layers=2, n_heads=4, vocab_size=256))
    assert any("llama3 has no experts" in p for p in llama_problems(llama, dims, job))


# --- Hugging Face both ways ------------------------------------------------------------------

def _hf_model(moe: bool, tie: bool = False):
    torch.manual_seed(0)
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=tie)
    if moe:
        config = transformers.Qwen3MoeConfig(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
                                             norm_topk_prob=True, **common)
        return transformers.Qwen3MoeForCausalLM(config).eval()
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common)).eval()


def _cairn_from_hf(hf_dir: Path, balancing_bias: bool = False) -> tuple[Transformer, dict]:
    args = Qwen3StateDictAdapter.from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    args.max_seq_len = 16
    if balancing_bias:
        args.moe.load_balance_coeff = 1e-3
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    init_weights(model, 0, "cpu")
    if balancing_bias:
        for moe in model.moe_layers():
            moe.expert_bias.fill_(0.5)  # a trained bias: HF has no place for it
    state = model.state_dict()
    result = load_hf(state, hf_dir, Qwen3StateDictAdapter(args))
    model.load_state_dict(state)
    return model.eval(), result


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_hugging_face_import_export_matches_transformers(tmp_path, moe):
    reference = _hf_model(moe, tie=not moe)
    reference.save_pretrained(tmp_path / "hf")
    model, result = _cairn_from_hf(tmp_path / "hf", balancing_bias=moe)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(tokens).logits
        torch.testing.assert_close(model(tokens), expected, atol=LOGITS_ATOL, rtol=0)
    if moe:  # per-expert keys joined into grouped tensors; the bias has no HF place: named, zeroed
        assert result["keys"] == result["tensors"] + 2 * 3 * (4 - 1)
        assert result["dropped"] == ["layers.0.moe.expert_bias", "layers.1.moe.expert_bias"]
        assert all(moe.expert_bias.abs().sum() == 0 for moe in model.moe_layers())

    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text((REPO / "assets/tokenizer/tokenizer.json").read_text())
    exported = save_hf(model.state_dict(), tmp_path / "out", Qwen3StateDictAdapter(model.args),
                       dtype="float32", tokenizer_dir=tmp_path / "tok")
    assert sorted(exported["dropped"]) == (["layers.0.moe.expert_bias", "layers.1.moe.expert_bias"] if moe else [])
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(loaded).__name__ == ("Qwen3MoeForCausalLM" if moe else "Qwen3ForCausalLM")
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, expected)


def conversion_script(name: str):
    """``main(argv)`` of scripts/checkpoint_conversion/<name>.py, run in this process."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "checkpoint_conversion" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_hf_to_cairn_to_hf_is_bitwise(tmp_path):
    from safetensors.torch import load_file

    _hf_model(moe=True).save_pretrained(tmp_path / "hf")
    assert conversion_script("convert_from_hf")(
        [str(tmp_path / "hf"), str(tmp_path / "dcp"), "--model_name", "qwen3", "--quiet"]) == 0
    assert conversion_script("convert_to_hf")(
        [str(tmp_path / "dcp"), str(tmp_path / "back"), "--model_name", "qwen3", "--hf_assets_path",
         str(tmp_path / "hf"), "--quiet"]) == 0
    before, after = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_an_hf_checkpoint_missing_an_expert_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    _hf_model(moe=True).save_pretrained(tmp_path / "hf")
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(HFCheckpointError, match=r"missing 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight' "
                                                r"\(for layers\.1\.moe\.experts\.w3\[3\]\)"):
        _cairn_from_hf(tmp_path / "hf")


# --- DCP checkpoints: every expert tensor counted, none loaded in part -----------------------

def _trained_moe(seed: int = 0):
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(_tiny_moe_args())
    model.to_empty(device="cpu")
    init_weights(model, seed, "cpu")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(seed))
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    optimizer.step()
    model.after_optimizer_step()
    return model, optimizer


def _manager(model, optimizer, folder) -> CheckpointManager:
    return CheckpointManager(CheckpointManager.Config(enable=True, folder=str(folder), interval=1),
                             model_parts=[model], states={"optimizer": OptimizerState(model, optimizer)},
                             sd_adapter=Qwen3StateDictAdapter(model.args))


def _rewrite_metadata(step_dir: Path, change) -> None:
    metadata = pickle.loads((step_dir / ".metadata").read_bytes())
    change(metadata.state_dict_metadata)
    (step_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    _resign_manifest(step_dir)  # a writer that lost the tensor, not a flipped byte: checksums agree


def _remove(key):
    return lambda saved: saved.pop(key)


def _zero_length(key):
    def change(saved):
        item = saved[key]
        item.size = torch.Size([0, *item.size[1:]])
        item.chunks[0].sizes = torch.Size([0, *item.chunks[0].sizes[1:]])
    return change


def _lose_experts(key):
    def change(saved):  # as if the rank holding experts 4-7 never wrote its chunk
        chunk = saved[key].chunks[0]
        chunk.sizes = torch.Size([4, *chunk.sizes[1:]])
    return change


@pytest.mark.parametrize("change,key,message", [
    (_remove, "layers.1.moe.experts.w2",
     r"model key 'layers\.1\.moe\.experts\.w2' is missing \(one of the 36 tensors of 8 experts "),
    (_remove, "optimizer.state.layers.0.moe.experts.w3.exp_avg_sq",
     r"key 'optimizer\.state\.layers\.0\.moe\.experts\.w3\.exp_avg_sq' is missing"),
    (_zero_length, "layers.2.moe.experts.w1", r"layers\.2\.moe\.experts\.w1: checkpoint shape \(0, 32, 64\) "
                                              r"\(zero-length\) != model shape \(8, 32, 64\)"),
    # a chunk gone from the metadata: its check (dcp_metadata) refuses the step before the key check
    (_lose_experts, "layers.3.moe.experts.w1", r"'layers\.3\.moe\.experts\.w1' declares shape \[8, 32, 64\] "
                                               r"\(16384 elements\), its chunks hold 8192"),
], ids=["model", "optimizer", "zero-length", "lost-chunk"])
def test_a_checkpoint_with_an_expert_tensor_lost_is_refused_naming_it(tmp_path, capsys, change, key, message):
    model, optimizer = _trained_moe()
    saver = _manager(model, optimizer, tmp_path / "ckpt")
    info = saver.save(1, last_step=False)
    saver.close()
    assert info.grouped == "36 tensors of 8 experts"  # 4 layers x w1/w2/w3 x (weight, exp_avg, exp_avg_sq)
    manifest = json.loads((tmp_path / "ckpt" / "step-1" / "cairn_manifest.json").read_text())
    assert manifest["grouped"]["experts"]["size"] == 8 and len(manifest["grouped"]["experts"]["keys"]) == 36

    _rewrite_metadata(tmp_path / "ckpt" / "step-1", change(key))
    fresh, fresh_optimizer = _trained_moe(seed=1)
    loader = _manager(fresh, fresh_optimizer, tmp_path / "ckpt")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        loader.load()
    loader.close()
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())  # nothing was touched

    from cairn.cli import main

    capsys.readouterr()
    assert main(["checkpoint", "verify", str(tmp_path / "ckpt"), "--color", "never"]) == 1
    assert key in capsys.readouterr().out


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_the_balancing_bias_and_experts_are_saved_and_loaded_as_trained(tmp_path, request, where):
    folder = tmp_path / "ckpt" if where == "folder" else request.getfixturevalue("s3").uri
    model, optimizer = _trained_moe()
    assert all(moe.expert_bias.abs().sum() > 0 for moe in model.moe_layers())
    saver = _manager(model, optimizer, folder)
    assert saver.save(1, last_step=False).grouped == "36 tensors of 8 experts"
    saver.close()
    fresh, fresh_optimizer = _trained_moe(seed=1)
    loader = _manager(fresh, fresh_optimizer, folder)
    assert loader.load()
    loader.close()
    assert all(torch.equal(value, fresh.state_dict()[key]) for key, value in model.state_dict().items())
