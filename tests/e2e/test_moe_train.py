"""Qwen3-MoE through the real entry point (torchrun, ``python -m cairn.train``) at EP 2: it trains,
saves counting its experts, and its last save is a Hugging Face export transformers loads."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import REPO, train

pytestmark = pytest.mark.slow


def test_moe_at_ep2_saves_experts_counted_and_exports_to_hf(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from cairn.cli import main

    run = train(tmp_path, "--parallelism.expert_parallel_degree", "2", "--training.steps", "4",
                "--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.last_save_in_hf",
                nproc=2, module="qwen3", config="qwen3_moe_debugmodel")
    records = [r for r in run.records if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["moe_load_max"] >= 1.0 and r["moe_aux_loss"] > 0 for r in records)
    assert "36 tensors of 8 experts counted" in run.output

    full = tmp_path / "checkpoint" / "step-2"
    manifest = json.loads((full / "cairn_manifest.json").read_text())
    assert manifest["layout"]["ep"] == 2 and len(manifest["grouped"]["experts"]["keys"]) == 36
    capsys.readouterr()
    assert main(["checkpoint", "inspect", str(full), "--color", "never"]) == 0
    shown = capsys.readouterr().out
    assert "layers.3.moe.experts.w2 [experts=8]" in shown and "every one present, whole" in shown
    assert "layout fsdp2 ep2" in shown
    assert main(["checkpoint", "verify", str(tmp_path / "checkpoint"), "--color", "never"]) == 0
    assert "36 tensors of 8 experts: every one present, whole" in capsys.readouterr().out

    # The last save is HF: per-expert keys, config.json and tokenizer files, the bias named as dropped.
    export = tmp_path / "checkpoint" / "step-4"
    manifest = json.loads((export / "cairn_manifest.json").read_text())
    assert manifest["hf_dropped"] == [f"layers.{i}.moe.expert_bias" for i in range(4)]
    assert (export / "tokenizer.json").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.num_experts == 8
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(16).view(1, 16)).logits).all()
    assert (REPO / "assets" / "tokenizer" / "tokenizer.json").read_text() == (export / "tokenizer.json").read_text()
