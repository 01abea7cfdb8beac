"""Context parallelism on 4 gloo ranks: one process, CP layouts, real Trainers and checkpoints.

One process group runs every check in-process, so the whole set costs one start-up:

- gradients: the tiny Llama at CP 2 x FSDP 2, CP 4, CP 2 x TP 2, CP 2 x PP 2 and HSDP 2 x CP 2
  (with activation checkpointing) computes one process's first loss, gradients and update
  (``test_parallelize.check_layout``);
- the Llama 3 debug model through the Trainer: CP 1 (FSDP 4), CP 2 (the parameters sharded over
  the 2 CP ranks, replicated twice) and CP 2 x FSDP 2 train 4 steps from the same weights and
  data: their losses equal CP 1's within LOSS_TOLERANCE and fall; each saves step 2;
- resumes load bitwise state and train on to step 4: CP 2 x FSDP 2 -> itself (its losses bitwise
  the uninterrupted run's), CP 2 -> CP 1, CP 1 -> CP 2 x TP 2, CP 2 x FSDP 2 -> CP 4, CP 2 ->
  CP 2 x PP 2 (within LOSS_TOLERANCE of the source's); the seeds' seed checkpoint starts a CP 2 run (its weights
  bitwise, its losses CP 1's);
- Qwen3 dense (CP 2 x FSDP 2) and Qwen3-MoE (CP 2 x EP 2 x FSDP 2) through the Trainer: one
  step's loss and every gradient (the load-balancing loss's included) are CP 1's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _launch import run_distributed  # noqa: E402
from test_moe import _committed_tensors, _differences, _gathered  # noqa: E402
from test_parallelize import check_layout  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# Another split of the attention (and of FSDP's sums) adds in another order: on this model every
# layout's losses stay within 9.5e-7 of CP 1's over 4 steps (one float32 ulp at 8; printed by the test).
LOSS_TOLERANCE = 2e-5
GRADIENT_TOLERANCE = 1e-5  # largest difference over the largest magnitude, per tensor
SEQ_LEN = 64  # divisible by 2 x 4: CP 4's eight chunks
# Global batch 8 everywhere: the data position carries over between layouts.
LAYOUTS = {
    "cp1": ["--training.local_batch_size", "2"],
    "cp2": ["--training.local_batch_size", "4", "--parallelism.context_parallel_degree", "2",
            "--parallelism.data_parallel_replicate_degree", "2", "--parallelism.data_parallel_shard_degree", "1"],
    "cp2_fsdp2": ["--training.local_batch_size", "4", "--parallelism.context_parallel_degree", "2"],
    "cp2_tp2": ["--training.local_batch_size", "8", "--parallelism.context_parallel_degree", "2",
                "--parallelism.tensor_parallel_degree", "2"],
    "cp4": ["--training.local_batch_size", "8", "--parallelism.context_parallel_degree", "4"],
    "cp2_pp2": ["--training.local_batch_size", "8", "--parallelism.context_parallel_degree", "2",
                "--parallelism.pipeline_parallel_degree", "2"],
}
SOURCES = ("cp1", "cp2", "cp2_fsdp2")
STEPS = 4
# (source, target): the same layout, then CP 2 -> 1, CP 1 -> CP 2 x TP 2, CP 2 x FSDP 2 -> CP 4,
# CP 2 -> CP 2 x PP 2.
PAIRS = [("cp2_fsdp2", "cp2_fsdp2"), ("cp2", "cp1"), ("cp1", "cp2_tp2"), ("cp2_fsdp2", "cp4"), ("cp2", "cp2_pp2")]
GRADIENT_LAYOUTS = {"cp2_fsdp2": dict(cp=2, dp_shard=2), "cp4": dict(cp=4), "cp2_tp2": dict(cp=2, tp=2),
                    "cp2_pp2": dict(cp=2, pp=2), "hsdp2_cp2_ac": dict(cp=2, dp_replicate=2, ac=True)}
QWEN3 = {  # config -> (CP 1 layout, CP 2 layout), global batch 8
    "qwen3_debugmodel": (LAYOUTS["cp1"], LAYOUTS["cp2_fsdp2"]),
    "qwen3_moe_debugmodel": (LAYOUTS["cp1"], [*LAYOUTS["cp2_fsdp2"], "--parallelism.expert_parallel_degree", "2"]),
}
# The seeds' seed-checkpoint command (docs/checkpoint.md, section 6).
SEED_COMMAND = ["-m", "cairn.train", "--module", "llama3", "--config", "llama3_debugmodel",
                "--checkpoint.create_seed_checkpoint", "--parallelism.data_parallel_replicate_degree", "1",
                "--parallelism.data_parallel_shard_degree", "1", "--parallelism.tensor_parallel_degree", "1",
                "--parallelism.pipeline_parallel_degree", "1", "--parallelism.context_parallel_degree", "1",
                "--parallelism.expert_parallel_degree", "1", "--training.seq_len", str(SEQ_LEN)]


def _trainer(folder: str, layout: list[str], config: str = "llama3_debugmodel", checkpoint: bool = True):
    """A Trainer whose weights are loaded or, from an empty folder, initialized (as ``train()`` does)."""
    from cairn.config import parse_args
    from cairn.trainer import Trainer

    trainer = Trainer(parse_args([
        "--module", config.split("_")[0], "--config", config, "--job.dump_folder", folder,
        "--training.seq_len", str(SEQ_LEN), "--training.steps", "6", "--metrics.no-enable_tensorboard",
        *(["--checkpoint.enable", "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "0"] if checkpoint
          else []), *layout]))
    trainer.loaded = trainer.checkpointer.load()
    return trainer


def _step(trainer) -> float:
    trainer.train_state.step += 1
    return trainer.train_step()["loss"]


def _gradients(trainer) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone())
            for part in trainer.model_parts for name, p in part.named_parameters()}


def _qwen3_errors(rank, root) -> dict[str, dict]:
    """Per config: the first losses at CP 1 and CP 2, and the largest relative gradient difference."""
    out = {}
    for config, (cp1, cp2) in QWEN3.items():
        results = []
        for name, layout in (("cp1", cp1), ("cp2", cp2)):
            trainer = _trainer(f"{root}/{config}_{name}", layout, config=config, checkpoint=False)
            loss = _step(trainer)  # the gradients stay on the parameters after the optimizer's step
            results.append((loss, _gradients(trainer)))
            trainer.checkpointer.close()
        (loss1, grads1), (loss2, grads2) = results
        out[config] = {"losses": (loss1, loss2), "error": max(
            ((grads2[k] - grads1[k]).abs().max() / grads1[k].abs().max()).item() for k in grads1)}
    return out


def _matrix(rank, world_size, root, seed_folder):
    import time

    out = {"losses": {}, "loaded": {}, "seconds": {}}
    start = time.perf_counter()
    out["gradient_losses"] = {}
    for name, degrees in GRADIENT_LAYOUTS.items():
        degrees = dict(degrees)
        ac = degrees.pop("ac", False)
        out["gradient_losses"][name] = check_layout(rank, world_size, degrees, ac)
    out["seconds"]["gradients"] = time.perf_counter() - start

    saved = {}
    for name in SOURCES:
        start = time.perf_counter()
        trainer = _trainer(f"{root}/{name}", LAYOUTS[name])
        assert not trainer.loaded
        losses = [_step(trainer), _step(trainer)]
        trainer.checkpointer.save(2)
        saved[name] = _gathered(trainer)
        losses += [_step(trainer) for _ in range(STEPS - 2)]
        out["losses"][name] = losses
        trainer.checkpointer.close()
        out["seconds"][name] = time.perf_counter() - start
    # The seeds' seed checkpoint (model weights only) is a source too, for a CP 2 run from step 0.
    saved["seed"] = _committed_tensors(Path(seed_folder) / "checkpoint" / "step-0")[1] if rank == 0 else None
    for source, target in [*PAIRS, ("seed", "cp2")]:
        start = time.perf_counter()
        trainer = _trainer(seed_folder if source == "seed" else f"{root}/{source}", LAYOUTS[target])
        state = _gathered(trainer, optimizer=source != "seed")  # a seed has no optimizer state
        out["losses"][(source, target)] = [_step(trainer) for _ in range(STEPS - trainer.loaded.step)]
        trainer.checkpointer.close()
        out["seconds"][(source, target)] = time.perf_counter() - start
        if rank == 0:
            out["loaded"][(source, target)] = (trainer.loaded.step, *_differences(saved[source], state,
                                                                                   set(saved[source])))
    start = time.perf_counter()
    out["qwen3"] = _qwen3_errors(rank, root)
    out["seconds"]["qwen3"] = time.perf_counter() - start
    return out if rank == 0 else None


def test_context_parallel_trains_like_one_process_and_reshards_bitwise(tmp_path):
    seed = subprocess.run([sys.executable, *SEED_COMMAND, "--job.dump_folder", str(tmp_path / "seed")],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert seed.returncode == 0, seed.stdout[-3000:] + seed.stderr[-3000:]

    out = run_distributed(_matrix, 4, str(tmp_path), str(tmp_path / "seed"), init_process_group=False,
                          timeout_s=900)[0]
    print({key: round(value, 1) for key, value in out["seconds"].items()})
    losses = out["losses"]
    deviations = {name: max(abs(a - b) for a, b in zip(run, losses["cp1"][-len(run):]))
                  for name, run in losses.items() if name != "cp1"}
    print("largest loss deviation from CP 1:", {name: f"{value:.1e}" for name, value in deviations.items()})

    # Every tiny-model layout computed one process's loss, gradients and update (checked on each rank).
    assert set(out["gradient_losses"]) == set(GRADIENT_LAYOUTS)

    # CP 2 and CP 2 x FSDP 2 start where CP 1 starts and train the same way; the loss falls.
    for name in SOURCES:
        assert losses[name] == pytest.approx(losses["cp1"], abs=LOSS_TOLERANCE), (name, losses[name], losses["cp1"])
        assert losses[name][-1] < losses[name][0] - 0.1, (name, losses[name])

    assert set(out["loaded"]) == {*PAIRS, ("seed", "cp2")}
    for (source, target), (step, only_one_side, different) in out["loaded"].items():
        # The whole state saved (every weight and optimizer moment of step 2; the seed's weights)
        # comes back bitwise.
        assert step == (0 if source == "seed" else 2), (source, target, step)
        assert not only_one_side and not different, (source, target, only_one_side, different)
        resumed, uninterrupted = losses[(source, target)], losses["cp1" if source == "seed" else source][step:]
        if source == target:  # the same layout: the run goes on bitwise as if never stopped
            assert resumed == uninterrupted, (source, resumed, uninterrupted)
        else:  # the seed holds the weights CP 1 started from: a CP 2 run from it trains as CP 1 did
            assert resumed == pytest.approx(uninterrupted, abs=LOSS_TOLERANCE), (source, target, resumed)

    for config, result in out["qwen3"].items():
        loss1, loss2 = result["losses"]
        assert loss2 == pytest.approx(loss1, abs=LOSS_TOLERANCE), (config, loss1, loss2)
        assert result["error"] < GRADIENT_TOLERANCE, (config, result["error"])
