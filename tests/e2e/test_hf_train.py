"""Hugging Face interop inside training runs: last_save_in_hf and initial_load_in_hf."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import train

pytestmark = pytest.mark.slow

RUN = ["--training.steps", "3", "--checkpoint.enable", "--checkpoint.interval", "10",
       "--checkpoint.last_save_model_only"]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    base = tmp_path_factory.mktemp("hf_train")
    train(base / "hf32", *RUN, "--checkpoint.last_save_in_hf", "--checkpoint.export_dtype", "float32")
    train(base / "dcp32", *RUN, "--checkpoint.export_dtype", "float32")
    train(base / "hf16", *RUN, "--checkpoint.last_save_in_hf", "--checkpoint.export_dtype", "bfloat16")
    return base


def _cairn_model(state: dict) -> torch.nn.Module:
    from cairn.models.llama3 import Transformer, llama3_flavors

    args = copy.deepcopy(llama3_flavors["tiny"])
    args.vocab_size = state["tok_embeddings.weight"].shape[0]
    args.max_seq_len = 32
    model = Transformer(args)
    model.load_state_dict(state)
    return model.eval()


def test_last_save_in_hf_loads_in_transformers_with_cairns_logits(exports, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    hf_dir = exports / "hf32" / "checkpoint" / "step-3"
    assert (hf_dir / "config.json").exists() and (hf_dir / "tokenizer.json").exists()
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()

    dcp_to_torch_save(exports / "dcp32" / "checkpoint" / "step-3", tmp_path / "final.pt")
    cairn_model = _cairn_model(torch.load(tmp_path / "final.pt", weights_only=True))
    tokens = torch.randint(0, 2048, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = cairn_model(tokens)
        got = hf_model(tokens).logits
    assert (got - expected).abs().max().item() < 1e-5

    for directory, dtype in ((hf_dir, torch.float32), (exports / "hf16" / "checkpoint" / "step-3", torch.bfloat16)):
        files = sorted(directory.glob("*.safetensors"))
        assert files
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                assert all(f.get_tensor(k).dtype == dtype for k in f.keys())
        assert json.loads((directory / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_initial_load_in_hf_on_one_and_four_ranks(exports, tmp_path):
    hf_dir = str(exports / "hf32" / "checkpoint" / "step-3")
    load = ["--checkpoint.enable", "--checkpoint.initial_load_in_hf", "--training.steps", "1"]
    one = train(tmp_path / "one", *load, "--checkpoint.initial_load_path", hf_dir,
                "--training.local_batch_size", "4")
    four = train(tmp_path / "four", *load, "--checkpoint.initial_load_path", hf_dir,
                 "--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2",
                 "--training.local_batch_size", "2", nproc=4)
    # The seed's other spelling: HF weights from --hf_assets_path when no initial_load_path is set.
    assets = train(tmp_path / "assets", *load, "--hf_assets_path", hf_dir, "--training.local_batch_size", "4")
    fresh = train(tmp_path / "fresh", "--training.steps", "1", "--training.local_batch_size", "4")
    assert "loaded Hugging Face weights" in one.output
    assert four.losses[1] == pytest.approx(one.losses[1], rel=2e-5)
    assert assets.losses[1] == one.losses[1]
    assert one.losses[1] != pytest.approx(fresh.losses[1], rel=1e-3)  # the HF weights were used
