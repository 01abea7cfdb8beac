"""Your own training loop, with FSDP2, checkpointed by cairn: async saves into reused pinned
buffers, crash-safe verified commits, bit-exact resume.

    torchrun --standalone --nproc_per_node 2 examples/own_loop.py --out /tmp/own_loop
    # kill it (here: SIGKILL after step 7, once the save in flight is committed), then run it again:
    torchrun --standalone --nproc_per_node 2 examples/own_loop.py --out /tmp/own_loop --kill-at 7
    torchrun --standalone --nproc_per_node 2 examples/own_loop.py --out /tmp/own_loop

Nothing here is cairn's model or trainer: a small transformer-ish MLP stack with dropout,
sharded with FSDP2, AdamW, a data stream whose position is a ``Stateful``. cairn sees it
through ``CheckpointManager`` alone. Each rank appends ``{"step", "loss"}`` lines to
``<out>/losses.jsonl`` (rank 0) and, at the end, writes a hash of every parameter and
optimizer tensor to ``<out>/final.json``, so two runs can be compared bit for bit.
Runs on CPU (gloo) or GPUs (NCCL, one process per GPU).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from cairn.checkpoint import CheckpointManager, OptimizerState, RNGState, verify


class Block(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)
        self.drop = nn.Dropout(0.1)  # the RNG state matters: resume must restore it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.down(torch.relu(self.up(self.norm(x)))))


class Model(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 32, layers: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(layers))
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.out(x)


class Batches(Stateful):
    """An endless stream of random token batches; its generator state is the data position.

    Each rank draws its own stream, so each saves its state under a key of its own: DCP keeps
    one copy of a plain (non-DTensor) value that every rank saves under the same key."""

    def __init__(self, seed: int, rank: int, batch: int = 8, seq: int = 16, vocab: int = 64):
        self.generator = torch.Generator().manual_seed(seed * 1000 + rank)
        self.key = f"rank_{rank}"
        self.batch, self.seq, self.vocab = batch, seq, vocab

    def next(self) -> torch.Tensor:
        return torch.randint(0, self.vocab, (self.batch, self.seq + 1), generator=self.generator)

    def state_dict(self) -> dict:
        return {self.key: self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.generator.set_state(state_dict[self.key])


def digest(state: dict) -> dict[str, str]:
    """sha256 of every tensor's full value (DTensors gathered), by key."""
    out = {}
    for key, value in sorted(state.items()):
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in digest(value).items()})
        elif isinstance(value, torch.Tensor):
            full = value.full_tensor() if isinstance(value, DTensor) else value
            out[key] = hashlib.sha256(full.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="run folder: checkpoints, losses.jsonl, final.json")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--interval", type=int, default=3)
    parser.add_argument("--async-mode", default="async_with_pinned_mem",
                        choices=("disabled", "async", "async_with_pinned_mem"))
    parser.add_argument("--kill-at", type=int, default=0,
                        help="after this step, once the save in flight is committed, SIGKILL this process")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    torch.manual_seed(0)
    mesh = init_device_mesh(device.type, (world,))
    model = Model().to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = Batches(seed=1, rank=rank)
    torch.manual_seed(100 + rank)  # dropout streams differ per rank; RNGState saves and restores them

    config = CheckpointManager.Config(enable=True, interval=args.interval, keep_latest_k=3, async_mode=args.async_mode,
                                      last_save_model_only=False)
    manager = CheckpointManager(config, model_parts=[model], base_folder=args.out,
                                states={"optimizer": OptimizerState(model, optimizer), "data": data,
                                        "rng": RNGState(device=device)})
    loaded = manager.load()  # a LoadResult: what was restored (step, tier, source); false on a fresh start
    if loaded and rank == 0:
        print(f"resumed from step {loaded.step} ({loaded.source})", flush=True)
    losses = Path(args.out) / "losses.jsonl"
    for step in range((loaded.step or 0) + 1, args.steps + 1):
        batch = data.next().to(device)
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        manager.maybe_wait_for_staging()  # an async save's copy is taken before the state changes
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        if rank == 0:
            with open(losses, "a") as f:
                f.write(json.dumps({"step": step, "loss": total.item() / world}) + "\n")
        manager.save(step, last_step=step == args.steps)
        if step == args.kill_at:
            if manager.last_save is not None:
                manager.last_save.result()  # so that the demo resumes from a recent step, not from scratch
            os.kill(os.getpid(), signal.SIGKILL)  # no close, no flush: a crash
    manager.close()
    final = digest({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)})
    problems = verify(manager.folder) if rank == 0 else []
    if rank == 0:
        (Path(args.out) / "final.json").write_text(json.dumps({"tensors": final, "verify_problems": problems}))
        print(f"done at step {args.steps}; every committed step verified: {not problems}", flush=True)
    dist.barrier()  # the ranks leave together: none tears its process group down while another still works
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
