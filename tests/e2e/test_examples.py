"""The examples of using cairn.checkpoint from a loop of your own run as users run them, and resume
bit for bit after a SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def run(args: list[str], *, torchrun: int = 0, expect_kill: bool = False) -> str:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)] \
        if torchrun else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*launcher, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    if expect_kill:
        assert proc.returncode != 0, output[-3000:]
        if not torchrun:
            assert proc.returncode == -signal.SIGKILL, output[-3000:]
    else:
        assert proc.returncode == 0, output[-4000:]
    return output


def losses(folder) -> dict[int, float]:
    """step -> loss; a step run again after a resume: its later record."""
    return {json.loads(line)["step"]: json.loads(line)["loss"] for line in (folder / "losses.jsonl").read_text().splitlines() if line}


@pytest.mark.parametrize("async_mode", ["async_with_pinned_mem", "disabled"])
def test_own_loop_with_fsdp2_resumes_bit_exact(tmp_path, async_mode):
    script = "examples/own_loop.py"
    whole, split = tmp_path / "whole", tmp_path / "split"
    run([script, "--out", str(whole), "--async-mode", async_mode], torchrun=2)
    run([script, "--out", str(split), "--async-mode", async_mode, "--kill-at", "7"], torchrun=2, expect_kill=True)
    assert not (split / "final.json").exists()
    output = run([script, "--out", str(split), "--async-mode", async_mode], torchrun=2)
    assert "resumed from step" in output
    resumed_from = int(output.split("resumed from step ")[1].split()[0])
    assert 3 <= resumed_from <= 7
    assert losses(split) == losses(whole)  # every step, the re-run ones included, bitwise
    a, b = json.loads((whole / "final.json").read_text()), json.loads((split / "final.json").read_text())
    assert a["tensors"] == b["tensors"] and len(a["tensors"]) > 20  # every weight and optimizer tensor
    assert a["verify_problems"] == [] and b["verify_problems"] == []


def test_transformers_model_in_a_plain_loop(tmp_path):
    transformers = pytest.importorskip("transformers")
    import torch

    script = "examples/hf_model_loop.py"
    whole, split = tmp_path / "whole", tmp_path / "split"
    run([script, "--out", str(whole)])
    run([script, "--out", str(split), "--kill-at", "6"], expect_kill=True)
    assert "resumed from step 4" in run([script, "--out", str(split)])
    assert losses(split) == losses(whole)
    a, b = json.loads((whole / "final.json").read_text()), json.loads((split / "final.json").read_text())
    assert a["weights"] == b["weights"]
    # the last step is a Hugging Face folder that transformers loads as it is, holding these weights
    export = whole / "checkpoint" / "step-12"
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(export))
    loaded = {key: hashlib.sha256(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
              .hexdigest() for key, value in model.state_dict().items()}
    assert loaded == a["weights"]
