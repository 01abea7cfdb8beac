"""Qwen3-MoE (``qwen3_moe_debugmodel``) on 4 gloo ranks, through the real Trainer and checkpointer.

One process group runs every check, in-process, so the whole set costs one start-up:

- sources: each layout trains 2 steps and saves step 2 (sync, async, async_with_pinned_mem, and a
  memory-tier snapshot); its full state (model, balancing bias, optimizer moments) is gathered
  then, and the loss of step 3 recorded; EP 1, 2 and 4 train on to step 4 (the loss falls);
- targets: each loads a source's step 2 on another layout (EP 1 <-> 2 <-> 4, with FSDP, TP 2,
  PP 2, HSDP) or the same one, and must hold bitwise the saved state; its step 3 loss must
  match the source's (bitwise on the same layout, within LOSS_TOLERANCE on another);
- with TP 2 and with HSDP, EP computes one process's gradients (the load-balancing loss's too);
- the seeds' seed-checkpoint command's step 0 starts an EP 2 run; an EP 4 model exported to
  Hugging Face loads back at EP 4 reading only each rank's experts; a tiny random Qwen3-MoE
  from transformers converts in, trains at EP 2, converts out and loads back in transformers.

Each rank gathers the full tensors of the keys it holds; rank 0 merges and compares.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
from _launch import run_distributed  # noqa: E402
from test_qwen3 import conversion_script  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
# Another layout sums in another order (FSDP reductions, TP matmul splits, EP row grouping):
# the first loss after a resharded load agrees with the uninterrupted run's to about 1e-6.
LOSS_TOLERANCE = 1e-4
# Two updates later: as above, and under PP the load-balancing loss balances each micro-batch (its
# expert loads are a micro-batch's), not the whole local batch: 1.4e-4 apart at step 3.
TRAJECTORY_TOLERANCE = 5e-4
# Global batch 8 everywhere: the data position carries over between layouts.
LAYOUTS = {
    "ep1": ["--training.local_batch_size", "2"],
    "ep2": ["--training.local_batch_size", "2", "--parallelism.expert_parallel_degree", "2"],
    "ep4": ["--training.local_batch_size", "2", "--parallelism.expert_parallel_degree", "4"],
    "ep2_tp2": ["--training.local_batch_size", "4", "--parallelism.tensor_parallel_degree", "2",
                "--parallelism.expert_parallel_degree", "2"],
    "ep4_tp2": ["--training.local_batch_size", "4", "--parallelism.tensor_parallel_degree", "2",
                "--parallelism.expert_parallel_degree", "4"],
    "ep1_pp2": ["--training.local_batch_size", "4", "--parallelism.pipeline_parallel_degree", "2"],
    "ep2_pp2": ["--training.local_batch_size", "4", "--parallelism.pipeline_parallel_degree", "2",
                "--parallelism.expert_parallel_degree", "2"],
    "ep2_hsdp": ["--training.local_batch_size", "2", "--parallelism.data_parallel_replicate_degree", "2",
                 "--parallelism.expert_parallel_degree", "2"],
}
MEMORY = ["--checkpoint.memory_interval", "2"]
# source -> (extra flags of its save, steps it trains)
SOURCES = {
    "ep1": ([], 4),
    # async saves (written by a thread: a writer process would start torch again on 2 cores), and a
    # memory-tier snapshot of the same step
    "ep2": (["--checkpoint.async_mode", "async_with_pinned_mem", "--checkpoint.async_writer", "thread",
             "--checkpoint.when_busy", "wait", *MEMORY], 4),
    "ep4": (["--checkpoint.async_mode", "async", "--checkpoint.async_writer", "thread", "--checkpoint.when_busy",
             "wait"], 4),
    "ep2_tp2": ([], 3),
    "ep4_tp2": ([], 3),
    "ep1_pp2": ([], 3),
    "ep2_pp2": ([], 3),
}
# (source, target layout, extra flags of the target): EP 1 -> 2 -> 4 -> 2 -> 1 -> 4 -> 2 across FSDP,
# TP 2, PP 2 and HSDP; resumes on the same layout, from disk and from the memory tier.
PAIRS = [("ep1", "ep2_tp2", []), ("ep2_tp2", "ep4_tp2", []), ("ep4_tp2", "ep2_pp2", []), ("ep2_pp2", "ep1_pp2", []),
         ("ep1_pp2", "ep4", []), ("ep4", "ep2_hsdp", []), ("ep2", "ep2", []), ("ep2", "ep2", MEMORY)]
# The seeds' command (docs/checkpoint.md, section 6), for the MoE model.
SEED_COMMAND = ["-m", "cairn.train", "--module", "qwen3", "--config", "qwen3_moe_debugmodel",
                "--checkpoint.create_seed_checkpoint", "--parallelism.data_parallel_replicate_degree", "1",
                "--parallelism.data_parallel_shard_degree", "1", "--parallelism.tensor_parallel_degree", "1",
                "--parallelism.pipeline_parallel_degree", "1", "--parallelism.context_parallel_degree", "1",
                "--parallelism.expert_parallel_degree", "1"]


def _trainer(folder: str, layout: str, *extra: str):
    from cairn.config import parse_args
    from cairn.trainer import Trainer

    trainer = Trainer(parse_args([
        "--module", "qwen3", "--config", "qwen3_moe_debugmodel", "--job.dump_folder", folder, "--checkpoint.enable",
        "--checkpoint.interval", "2", "--training.steps", "6", "--checkpoint.keep_latest_k", "0",
        "--checkpoint.memory_dir", f"{folder}/memory", *LAYOUTS[layout], *extra]))
    return trainer


def _step(trainer) -> float:
    trainer.train_state.step += 1
    return trainer.train_step()["loss"]


def _gathered(trainer, optimizer: bool = True) -> dict[str, torch.Tensor] | None:
    """Every model and optimizer tensor as a full tensor, on rank 0 (None elsewhere).

    ``optimizer=False`` before a fresh optimizer's first step: its state dict would create the
    state with a step of its own (lr 0, but Adam's step count moves), changing the next update."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.tensor import DTensor

    def full(value):
        return value.full_tensor() if isinstance(value, DTensor) else value.detach().clone()

    mine = {}
    for part in trainer.model_parts:
        mine.update({key: full(value) for key, value in get_model_state_dict(part).items()})
    if optimizer:
        mine.update({f"optimizer.{key}": full(value) for key, value in trainer.optimizers.state_dict().items()
                     if isinstance(value, torch.Tensor)})
    per_rank = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, per_rank, dst=0)
    if dist.get_rank() != 0:
        return None
    merged = {}
    for held in per_rank:
        for key, value in held.items():
            merged.setdefault(key, value)
    return merged


def _differences(expected: dict, state: dict, keys=None) -> tuple[list[str], list[str]]:
    """(keys on one side only, keys whose tensors differ in a bit)."""
    keys = set(expected) if keys is None else keys
    return (sorted((set(expected) ^ set(state)) & keys),
            sorted(key for key in keys if key in state and not torch.equal(expected[key], state[key])))


GRADIENT_LAYOUTS = {"ep2_tp2": dict(dp_shard=2, tp=2, ep=2), "ep2_hsdp": dict(dp_replicate=2, dp_shard=2, ep=2)}


def _gradient_errors(rank) -> dict[str, float]:
    """The largest relative difference between a layout's gradients (load-balancing loss included)
    and those of one process on the whole batch, per layout."""
    import copy

    import torch.distributed as dist
    import torch.nn.functional as F

    from cairn.config import parse_args
    from cairn.distributed.parallel_dims import ParallelDims
    from cairn.models.common import init_weights
    from cairn.models.qwen3.flavors import qwen3_flavors
    from cairn.models.qwen3.model import Transformer
    from cairn.models.qwen3.parallelize import parallelize_qwen3

    args = copy.deepcopy(qwen3_flavors["moe_debugmodel"])
    args.vocab_size, args.max_seq_len = 256, 32
    tokens = torch.randint(0, 256, (8, 33), generator=torch.Generator().manual_seed(0))

    def grads(model, inputs, labels, tokens_per_step):
        model.train()
        model.set_tokens_per_step(tokens_per_step)
        F.cross_entropy(model(inputs).flatten(0, 1), labels.flatten()).backward()
        return {name: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                for name, p in model.named_parameters()}

    with torch.device("meta"):
        reference = Transformer(args)
    reference.to_empty(device="cpu")
    init_weights(reference, 7, "cpu")
    expected = grads(reference, tokens[:, :-1], tokens[:, 1:], 8 * 32)
    errors = {}
    for name, degrees in GRADIENT_LAYOUTS.items():
        dims = ParallelDims(**{"dp_replicate": 1, "tp": 1, "pp": 1, **degrees}, world_size=4)
        dims.build_mesh("cpu")
        with torch.device("meta"):
            model = Transformer(args)
        parallelize_qwen3(model, dims, parse_args(["--module", "qwen3", "--training.seq_len", "32"]), "cpu")
        model.to_empty(device="cpu")
        init_weights(model, 7, "cpu")
        rows = 8 // dims.dp_degree
        first = dims.dp_mesh.get_local_rank() * rows
        got = grads(model, tokens[first:first + rows, :-1], tokens[first:first + rows, 1:], rows * 32)
        errors[name] = max(((got[k] - expected[k]).abs().max() / expected[k].abs().max()).item() for k in expected)
        dist.barrier()
    return errors


def _matrix(rank, world_size, root, seed_folder, hf_dcp):
    import time

    out = {"losses": {}, "loaded": {}, "tier": {}, "seconds": {}}
    start = time.perf_counter()
    out["gradient_errors"] = _gradient_errors(rank)
    out["seconds"]["gradients"] = time.perf_counter() - start
    saved = {}
    for name, (extra, steps) in SOURCES.items():
        start = time.perf_counter()
        trainer = _trainer(f"{root}/{name}", name, *extra)
        losses = [_step(trainer), _step(trainer)]
        trainer.checkpointer.save(2)
        saved[name] = _gathered(trainer)
        losses += [_step(trainer) for _ in range(steps - 2)]
        out["losses"][name] = losses
        trainer.checkpointer.close()  # waits for an async save's commit
        out["seconds"][name] = time.perf_counter() - start
    for source, target, extra in PAIRS:
        pair = (source, target, bool(extra))
        start = time.perf_counter()
        trainer = _trainer(f"{root}/{source}", target, *extra)
        assert trainer.checkpointer.load()
        out["tier"][pair] = trainer.checkpointer.last_load.get("tier")
        state = _gathered(trainer)
        if target == "ep4":
            out["hf"] = _hf_export_and_load_at_ep4(rank, root, trainer, state)
        steps = SOURCES[source][1] if target == source else 3
        out["losses"][pair] = [_step(trainer) for _ in range(steps - 2)]
        trainer.checkpointer.close()
        out["seconds"][pair] = time.perf_counter() - start
        if rank == 0:
            expected = saved[source]
            experts = [key for key, value in expected.items() if ".moe.experts." in key and value.dim() > 0]
            out["loaded"][pair] = (*_differences(expected, state), len(experts))
    if rank == 0:
        out["bias_moved"] = {name: all(state[key].abs().sum() > 0 for key in state if key.endswith("expert_bias"))
                             for name, state in saved.items()}
    out["seed"] = _ep2_run_from_seed(rank, seed_folder)
    out["hf_train"] = _train_from_hf_at_ep2(rank, root, hf_dcp)
    return out if rank == 0 else None


def _hf_export_and_load_at_ep4(rank, root, exporter, exported):
    """The exporter's model (loaded at EP 4) to HF, then loaded back at EP 4 with
    --checkpoint.initial_load_in_hf: each rank reads only its own experts' keys."""
    import torch.distributed as dist

    from cairn.checkpoint import hf

    hf.save_hf(exporter.checkpointer.model.state_dict(), f"{root}/hf", exporter.checkpointer.sd_adapter,
               dtype="float32")
    read, real_read = [], hf.HFWeights.read

    def spy(weights, key):
        read.append(key)
        return real_read(weights, key)

    hf.HFWeights.read = spy
    try:
        loader = _trainer(f"{root}/hf_load", "ep4", "--checkpoint.initial_load_in_hf",
                          "--checkpoint.initial_load_path", f"{root}/hf")
        assert loader.checkpointer.load()
    finally:
        hf.HFWeights.read = real_read
    loaded = _gathered(loader)
    loader.checkpointer.close()
    experts_read = sorted({int(key.split(".")[5]) for key in read if ".mlp.experts." in key})
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, experts_read)
    if rank != 0:
        return None
    weights = {key for key in exported if not key.startswith("optimizer.") and not key.endswith("expert_bias")}
    return {"experts_read": every_rank, "differences": _differences(exported, loaded, weights),
            "bias_zero": all(loaded[key].abs().sum() == 0 for key in loaded if key.endswith("expert_bias"))}


def _ep2_run_from_seed(rank, seed_folder):
    """An EP 2 run whose checkpoint folder holds only the seed: it starts from step 0, bitwise."""
    trainer = _trainer(seed_folder, "ep2")
    assert trainer.checkpointer.load()
    last = dict(trainer.checkpointer.last_load)
    state = _gathered(trainer)
    loss = _step(trainer)
    trainer.checkpointer.close()
    if rank != 0:
        return None
    seed, tensors = _committed_tensors(Path(seed_folder) / "checkpoint" / "step-0")
    return {"kind": last["kind"], "from_step": last["from_step"], "loss": loss,
            "differences": _differences(tensors, state, set(tensors)), "grouped": seed.manifest.get("grouped")}


def _committed_tensors(step_dir: Path):
    """(the step's reader, every tensor it holds, read whole)."""
    from cairn.checkpoint.readers import DcpCheckpoint

    step = DcpCheckpoint(step_dir)
    return step, step.read([key for key, entry in step.entries().items() if entry.is_tensor])


def _train_from_hf_at_ep2(rank, root, hf_dcp):
    """Start at EP 2 from a converted HF checkpoint, train 2 steps, save the model for export."""
    trainer = _trainer(f"{root}/from_hf", "ep2", "--checkpoint.initial_load_path", hf_dcp,
                       "--training.steps", "2")
    assert trainer.checkpointer.load()
    losses = [_step(trainer), _step(trainer)]
    trainer.checkpointer.save(2, last_step=True)  # model only, float32
    trainer.checkpointer.close()
    return {"losses": losses, "step": f"{root}/from_hf/checkpoint/step-2"} if rank == 0 else None


def _tiny_hf_qwen3_moe(out_dir: Path) -> None:
    """A random Qwen3-MoE from transformers with qwen3_moe_debugmodel's shapes."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, rope_theta=1_000_000.0, tie_word_embeddings=False)
    transformers.Qwen3MoeForCausalLM(config).save_pretrained(out_dir)


def _run(*args) -> None:
    run = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_moe_trains_and_reshards_bitwise_across_expert_parallel_degrees(tmp_path):
    transformers = pytest.importorskip("transformers")
    _run(*SEED_COMMAND, "--job.dump_folder", tmp_path / "seed")
    _tiny_hf_qwen3_moe(tmp_path / "hf_in")
    assert conversion_script("convert_from_hf")(
        [str(tmp_path / "hf_in"), str(tmp_path / "hf_dcp"), "--model_name", "qwen3", "--model_flavor",
         "moe_debugmodel", "--quiet"]) == 0

    out = run_distributed(_matrix, 4, str(tmp_path), str(tmp_path / "seed"), str(tmp_path / "hf_dcp"),
                          init_process_group=False, timeout_s=900)[0]
    print({key: round(value, 1) for key, value in out["seconds"].items()})
    losses = out["losses"]

    # TP 2 x EP 2 x FSDP 2 and HSDP 2 x 2 x EP 2 compute one process's gradients on the whole batch.
    assert all(error < 1e-5 for error in out["gradient_errors"].values()), out["gradient_errors"]

    # EP 1, 2 and 4 train the same model on the same data: the loss falls, the same way; so do
    # EP with TP 2 and with PP 2 (their updates are those of one process).
    for name in ("ep1", "ep2", "ep4"):
        assert losses[name][-1] < losses[name][0] - 0.2, (name, losses[name])
    for name in SOURCES:
        assert losses[name] == pytest.approx(losses["ep1"][:len(losses[name])], abs=TRAJECTORY_TOLERANCE), name
    assert all(out["bias_moved"].values()), out["bias_moved"]

    for (source, target, memory), (only_one_side, different, num_experts) in out["loaded"].items():
        # Every key (experts, router, balancing bias, optimizer moments) loads bitwise.
        assert not only_one_side, (source, target, only_one_side)
        assert not different, (source, target, different)
        assert num_experts == 4 * 3 * 3, (source, target)  # 4 layers x w1/w2/w3 x (weight, 2 moments)
        resumed = losses[(source, target, memory)]
        uninterrupted = losses[source][2:2 + len(resumed)]
        if target == source:
            assert resumed == uninterrupted, (source, target)  # same layout: bit for bit
        else:
            assert resumed == pytest.approx(uninterrupted, abs=LOSS_TOLERANCE), (source, target)
    assert out["tier"][("ep2", "ep2", True)] == "memory"
    assert out["tier"][("ep2", "ep2", False)] == "disk"

    # An HF load at EP 4 reads only each rank's two experts, and loads every weight bitwise.
    assert out["hf"]["experts_read"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert out["hf"]["differences"] == ([], [])
    assert out["hf"]["bias_zero"]  # HF has no place for it: an import starts it at zero

    # The seed (one CPU process, EP 1) starts the EP 2 run: step 0, every tensor as seeded.
    seed = out["seed"]
    assert (seed["kind"], seed["from_step"]) == ("seed", 0)
    assert seed["differences"] == ([], [])
    assert seed["grouped"]["experts"]["size"] == 8 and len(seed["grouped"]["experts"]["keys"]) == 12

    # A tiny random transformers Qwen3-MoE: converted in, trained at EP 2, converted out, loaded back.
    trained = out["hf_train"]
    assert all(loss == loss for loss in trained["losses"])
    assert conversion_script("convert_to_hf")(
        [trained["step"], str(tmp_path / "hf_out"), "--model_name", "qwen3", "--model_flavor", "moe_debugmodel",
         "--hf_assets_path", str(tmp_path / "hf_in"), "--quiet"]) == 0
    from safetensors.torch import load_file

    before, now = (load_file(tmp_path / name / "model.safetensors") for name in ("hf_in", "hf_out"))
    assert before.keys() == now.keys()  # every expert's key, and no balancing bias
    assert not torch.equal(before["model.layers.0.mlp.experts.5.gate_proj.weight"],
                           now["model.layers.0.mlp.experts.5.gate_proj.weight"])
    after = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_out")
    assert type(after).__name__ == "Qwen3MoeForCausalLM"
    tokens = torch.randint(0, 2048, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(after(tokens).logits).all()
