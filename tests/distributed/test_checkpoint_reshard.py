"""A checkpoint saved under one layout loads under another with every tensor intact.

Step 1 saves a real training state with torchrun (tests/e2e harness); step 2 builds the
Trainer on N gloo ranks of another layout, loads, and gathers the full model and optimizer
tensors, which must equal the saved ones exactly (resharding moves bytes, never rounds them).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
from conftest import train  # noqa: E402

from _launch import run_distributed  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAYOUTS = {
    "dp4": (4, ["--parallelism.data_parallel_shard_degree", "4", "--training.local_batch_size", "1"]),
    "dp2": (2, ["--parallelism.data_parallel_shard_degree", "2", "--training.local_batch_size", "2"]),
    "dp2_tp2": (4, ["--parallelism.data_parallel_shard_degree", "2", "--parallelism.tensor_parallel_degree", "2",
                    "--training.local_batch_size", "2"]),
    "pp2": (2, ["--parallelism.pipeline_parallel_degree", "2", "--training.local_batch_size", "4"]),
    "single": (1, []),
}
PAIRS = [("dp4", "dp2"), ("dp2", "dp2_tp2"), ("pp2", "single"), ("single", "dp4")]


def _load_and_gather(rank, world_size, dump_folder, layout_args):
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from cairn.config import parse_args
    from cairn.trainer import Trainer

    config = parse_args(["--module", "llama3", "--config", "llama3_tiny", "--job.dump_folder", dump_folder,
                         "--checkpoint.enable", "--training.steps", "6", *layout_args])
    trainer = Trainer(config)
    assert trainer.checkpointer.load()
    full = StateDictOptions(full_state_dict=True, cpu_offload=True, flatten_optimizer_state_dict=True)
    model, optim = {}, {}
    for part, optimizer in zip(trainer.model_parts, trainer.optimizers.optimizers):
        model.update(get_model_state_dict(part, options=full))
        optim.update(get_optimizer_state_dict(part, optimizer, options=full))
    trainer.checkpointer.close()
    return (model, optim, trainer.train_state.step, trainer.dataloader.state_dict()) if rank == 0 else None


@pytest.mark.parametrize("source,target", PAIRS, ids=[f"{a}_to_{b}" for a, b in PAIRS])
def test_resharded_load_restores_every_tensor(tmp_path, source, target):
    nproc_a, args_a = LAYOUTS[source]
    train(tmp_path, "--checkpoint.enable", "--checkpoint.interval", "3", "--training.steps", "6",
          "--debug.exit_after_step", "3", *args_a, nproc=nproc_a)
    dcp_to_torch_save(tmp_path / "checkpoint" / "step-3", tmp_path / "saved.pt")
    saved = torch.load(tmp_path / "saved.pt", weights_only=False)

    nproc_b, args_b = LAYOUTS[target]
    model, optim, step, data_state = run_distributed(_load_and_gather, nproc_b, str(tmp_path), args_b,
                                                     init_process_group=False, timeout_s=300)[0]
    assert step == 3
    assert data_state["position"] == saved["dataloader"]["position"]
    saved_model = {k: v for k, v in saved.items() if isinstance(v, torch.Tensor)}
    assert model.keys() == saved_model.keys()
    for key, value in saved_model.items():
        assert torch.equal(model[key], value), key
    saved_optim = saved["optimizer"]
    tensors = {k: v for k, v in saved_optim.items() if isinstance(v, torch.Tensor)}
    assert tensors, "the optimizer state was not saved"
    for key, value in tensors.items():
        assert torch.equal(torch.as_tensor(optim[key]).float(), value.float()), key
