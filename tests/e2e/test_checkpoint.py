"""The checkpoint manager in real training runs: every option of the seeds, resume, resharding."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from conftest import REPO, train

pytestmark = pytest.mark.slow

CKPT = ["--checkpoint.enable", "--checkpoint.no-last_save_model_only"]


def load_dcp(step_dir: Path, tmp_path: Path) -> dict:
    out = tmp_path / f"{step_dir.parent.parent.name}-{step_dir.name}.pt"
    dcp_to_torch_save(step_dir, out)
    return torch.load(out, weights_only=False)


def model_tensors(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def tree_hash(folder: Path) -> dict[str, str]:
    """Every saved file's hash; the folder's lease (which run used it last, a released record that
    each run writes anew) aside, checked as released."""
    from cairn.checkpoint.layout import lease_generation
    from cairn.checkpoint.lease import lease_state
    from cairn.checkpoint.store import open_store

    assert lease_state(open_store(str(folder))) is None  # no run holds it
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and lease_generation(p.name) is None}


def steps_in(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.glob("step-*") if p.is_dir())


# --- bit-exact resume --------------------------------------------------------------------

@pytest.mark.parametrize("nproc", [1, 4])
@pytest.mark.parametrize("async_mode", ["disabled", "async", "async_with_pinned_mem"])
def test_resume_is_bit_exact(tmp_path, async_mode, nproc):
    common = [*CKPT, "--checkpoint.interval", "5", "--checkpoint.async_mode", async_mode,
              "--checkpoint.last_save_model_only", "--training.steps", "20"]
    if nproc == 4:
        common += ["--parallelism.data_parallel_shard_degree", "4", "--training.local_batch_size", "1"]
    if async_mode == "async_with_pinned_mem":  # with two writer threads (and files) per rank
        common += ["--checkpoint.write_threads", "2"]
    whole = train(tmp_path / "whole", *common, nproc=nproc)
    if async_mode == "async_with_pinned_mem":  # every full save wrote two files per rank
        full = [step for step in steps_in(tmp_path / "whole" / "checkpoint") if step != 20]
        assert full and all(len(list((tmp_path / "whole" / "checkpoint" / f"step-{step}").glob("*.distcp")))
                            == 2 * nproc for step in full), full
    train(tmp_path / "split", *common, "--debug.exit_after_step", "10", nproc=nproc)
    assert steps_in(tmp_path / "split" / "checkpoint")[-1] == 10
    resumed = train(tmp_path / "split", *common, nproc=nproc)
    assert "loaded full checkpoint" in resumed.output
    for step in range(11, 21):
        assert resumed.losses[step] == whole.losses[step], step  # bitwise: same float
    final_a = load_dcp(tmp_path / "whole" / "checkpoint" / "step-20", tmp_path)
    final_b = load_dcp(tmp_path / "split" / "checkpoint" / "step-20", tmp_path)
    assert final_a.keys() == final_b.keys()
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key


# --- resharding ----------------------------------------------------------------------------

RESHARD = {
    "dp4_to_dp2": (4, ["--parallelism.data_parallel_shard_degree", "4", "--training.local_batch_size", "1"],
                   2, ["--parallelism.data_parallel_shard_degree", "2", "--training.local_batch_size", "2"]),
    "dp2_to_dp2tp2": (2, ["--parallelism.data_parallel_shard_degree", "2", "--training.local_batch_size", "2"],
                      4, ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree",
                          "2", "--training.local_batch_size", "2"]),
    "pp2_to_none": (2, ["--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "4"],
                    1, []),
    "1_to_dp4": (1, [], 4, ["--parallelism.data_parallel_shard_degree", "4", "--training.local_batch_size", "1"]),
}


@pytest.mark.parametrize("case", sorted(RESHARD))
def test_resharded_resume_continues_training(tmp_path, case):
    """Save under one layout, resume under another: training goes on as if uninterrupted.

    The exact equality of every model and optimizer tensor right after a resharded load is
    checked in tests/distributed/test_checkpoint_reshard.py.
    """
    nproc_a, layout_a, nproc_b, layout_b = RESHARD[case]
    common = [*CKPT, "--checkpoint.interval", "3", "--training.steps", "6", "--checkpoint.keep_latest_k", "0"]
    train(tmp_path / "a", *common, *layout_a, "--debug.exit_after_step", "3", nproc=nproc_a)
    uninterrupted = train(tmp_path / "ref", *common, *layout_a, nproc=nproc_a)
    resumed = train(tmp_path / "a", *common, *layout_b, nproc=nproc_b)
    assert "loaded full checkpoint" in resumed.output
    assert "re-seeded" in resumed.output  # RNG: a new layout gets fresh per-rank streams
    for step in (4, 5, 6):
        assert resumed.losses[step] == pytest.approx(uninterrupted.losses[step], rel=1e-4), step
    step6 = load_dcp(tmp_path / "a" / "checkpoint" / "step-6", tmp_path)
    ref6 = load_dcp(tmp_path / "ref" / "checkpoint" / "step-6", tmp_path)
    for key, value in model_tensors(ref6).items():
        torch.testing.assert_close(step6[key], value, rtol=1e-3, atol=1e-4)


# --- seed checkpoint ---------------------------------------------------------------------------

def test_seed_checkpoint_then_pp_and_tp_start_from_it(tmp_path):
    seed_run = train(tmp_path / "seed", "--checkpoint.enable", "--checkpoint.create_seed_checkpoint",
                     "--parallelism.data_parallel_replicate_degree", "1", "--parallelism.data_parallel_shard_degree",
                     "1", "--parallelism.tensor_parallel_degree", "1", "--parallelism.pipeline_parallel_degree", "1",
                     "--parallelism.context_parallel_degree", "1", "--parallelism.expert_parallel_degree", "1",
                     "--debug.seed", "7")
    assert steps_in(tmp_path / "seed" / "checkpoint") == [0]
    assert seed_run.losses == {}
    seed_dir = tmp_path / "seed" / "checkpoint" / "step-0"
    first_losses = []
    for name, nproc, layout in [("pp", 2, ["--parallelism.pipeline_parallel_degree", "2"]),
                                ("dp_tp", 4, ["--parallelism.data_parallel_shard_degree", "2",
                                              "--parallelism.tensor_parallel_degree", "2"]),
                                ("single", 1, [])]:
        folder = tmp_path / name / "checkpoint"
        folder.mkdir(parents=True)
        # A seed checkpoint is used by copying it in as step-0 of the new run's folder.
        subprocess.run(["cp", "-r", str(seed_dir), str(folder / "step-0")], check=True)
        result = train(tmp_path / name, "--checkpoint.enable", "--training.steps", "1", *layout,
                       "--training.local_batch_size", "4" if nproc != 4 else "2", nproc=nproc)
        assert "loaded seed checkpoint" in result.output
        first_losses.append(result.losses[1])
    assert first_losses[0] == pytest.approx(first_losses[2], rel=2e-5)
    assert first_losses[1] == pytest.approx(first_losses[2], rel=2e-5)
    # Different from a fresh init with the default seed (42): the seed checkpoint's weights were used.
    fresh = train(tmp_path / "fresh", "--training.steps", "1")
    assert fresh.losses[1] != pytest.approx(first_losses[2], rel=1e-6)


# --- each option -----------------------------------------------------------------------------

def test_interval_first_step_and_keep_latest_k(tmp_path):
    train(tmp_path / "a", *CKPT, "--checkpoint.interval", "3", "--training.steps", "10",
          "--checkpoint.enable_first_step_checkpoint", "--checkpoint.keep_latest_k", "0")
    assert steps_in(tmp_path / "a" / "checkpoint") == [1, 3, 6, 9, 10]
    train(tmp_path / "b", *CKPT, "--checkpoint.interval", "2", "--training.steps", "10",
          "--checkpoint.keep_latest_k", "2")
    assert steps_in(tmp_path / "b" / "checkpoint") == [8, 10]


def test_last_save_model_only_in_export_dtype(tmp_path):
    train(tmp_path, "--checkpoint.enable", "--checkpoint.interval", "4", "--training.steps", "6",
          "--checkpoint.last_save_model_only", "--checkpoint.export_dtype", "bfloat16",
          "--checkpoint.keep_latest_k", "0")
    full = load_dcp(tmp_path / "checkpoint" / "step-4", tmp_path)
    final = load_dcp(tmp_path / "checkpoint" / "step-6", tmp_path)
    assert "optimizer" in full and "dataloader" in full
    assert set(final) == set(model_tensors(full))  # model FQNs only
    assert all(t.dtype == torch.bfloat16 for t in final.values())
    assert all(t.dtype == torch.float32 for t in model_tensors(full).values())
    # Stock torch's converter, as the seeds show it.
    out = tmp_path / "final.pt"
    subprocess.run([sys.executable, "-m", "torch.distributed.checkpoint.format_utils", "dcp_to_torch",
                    str(tmp_path / "checkpoint" / "step-6"), str(out)], check=True, cwd=REPO)
    converted = torch.load(out, weights_only=True)
    for key, value in final.items():
        assert torch.equal(converted[key], value)


def test_load_step_resumes_from_an_older_step(tmp_path):
    common = [*CKPT, "--checkpoint.interval", "2", "--training.steps", "8", "--checkpoint.keep_latest_k", "0"]
    first = train(tmp_path, *common, "--debug.exit_after_step", "6")
    again = train(tmp_path, *common, "--checkpoint.load_step", "4", "--debug.exit_after_step", "6")
    assert "loaded full checkpoint" in again.output and "step-4" in again.output
    assert again.losses[5] == first.losses[5] and again.losses[6] == first.losses[6]


def test_exclude_from_loading(tmp_path):
    common = [*CKPT, "--checkpoint.interval", "5", "--training.steps", "10"]
    whole = train(tmp_path / "whole", *common)
    train(tmp_path / "x", *common, "--debug.exit_after_step", "5")
    resumed = train(tmp_path / "x", *common, "--checkpoint.exclude_from_loading", "data_loader")
    # Same weights and optimizer, but the data stream restarted: different batches, different losses.
    assert resumed.losses[6] != whole.losses[6]
    train(tmp_path / "y", *common, "--debug.exit_after_step", "5")
    restarted = train(tmp_path / "y", *common, "--checkpoint.exclude_from_loading", "train_state",
                      "--debug.exit_after_step", "2")
    assert sorted(restarted.losses) == [1, 2, 3, 4, 5]  # steps 1..5 from the first run, 1..2 again


def test_load_only_never_saves(tmp_path):
    train(tmp_path, *CKPT, "--checkpoint.interval", "2", "--training.steps", "4")
    before = tree_hash(tmp_path / "checkpoint")
    train(tmp_path, *CKPT, "--checkpoint.interval", "1", "--training.steps", "8", "--checkpoint.load_only")
    assert tree_hash(tmp_path / "checkpoint") == before


def test_initial_load_path_model_only_and_full(tmp_path):
    train(tmp_path / "src", *CKPT, "--checkpoint.interval", "3", "--training.steps", "3")
    src = tmp_path / "src" / "checkpoint" / "step-3"
    model_only = train(tmp_path / "ft", "--checkpoint.enable", "--checkpoint.initial_load_path", str(src),
                       "--training.steps", "2")
    assert "loaded initial checkpoint" in model_only.output and sorted(model_only.losses) == [1, 2]
    full = train(tmp_path / "cont", "--checkpoint.enable", "--checkpoint.initial_load_path", str(src),
                 "--checkpoint.no-initial_load_model_only", "--training.steps", "5")
    assert sorted(full.losses) == [4, 5]
    # Once the run has its own step, initial_* is ignored (fault tolerance wins).
    again = train(tmp_path / "cont", "--checkpoint.enable", "--checkpoint.initial_load_path", "/nonexistent",
                  "--training.steps", "5")
    assert again.losses and "loaded model_only checkpoint" in again.output or "loaded" in again.output


# --- bad input ---------------------------------------------------------------------------------

def test_bad_input_errors_and_nothing_touched(tmp_path):
    train(tmp_path, *CKPT, "--checkpoint.interval", "2", "--training.steps", "2")
    before = tree_hash(tmp_path / "checkpoint")

    missing = train(tmp_path, *CKPT, "--checkpoint.load_step", "7", "--training.steps", "4", check=False)
    assert missing.returncode != 0 and "--checkpoint.load_step=7 not found" in missing.output

    bad_key = train(tmp_path, *CKPT, "--checkpoint.exclude_from_loading", "weights", check=False)
    assert bad_key.returncode != 0 and "unknown key 'weights'" in bad_key.output

    wrong_model = train(tmp_path, *CKPT, "--config", "llama3_debugmodel", "--training.steps", "4",
                        "--training.seq_len", "32", check=False)
    assert wrong_model.returncode != 0 and "does not match this model" in wrong_model.output
    assert "layers.0.attention.wq.weight" in wrong_model.output

    other_batch = train(tmp_path, *CKPT, "--training.steps", "4", "--training.local_batch_size", "8", check=False)
    assert other_batch.returncode != 0 and "--training.global_batch_size" in other_batch.output
    assert "--checkpoint.exclude_from_loading dataloader" in other_batch.output

    as_file = tmp_path / "file_not_folder"
    as_file.write_text("x")
    not_dir = train(tmp_path / "other", "--checkpoint.enable", "--checkpoint.folder", str(as_file), check=False)
    assert not_dir.returncode != 0 and str(as_file) in not_dir.output

    assert tree_hash(tmp_path / "checkpoint") == before
