"""A training loop written from docs/checkpoint.md section 16 alone, as a new user would: one
process, a plain PyTorch model and optimizer, no cairn model, trainer or example code.

    python tests/e2e/held_out_loop.py --out <folder> --steps 20 --interval 2 --step-seconds 0.5

Prints ``resumed <step>`` once, then ``step <n> <what save() did>`` after every step, so a test
can SIGKILL it at a chosen step and count the steps lost when it runs again.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from cairn.checkpoint import CheckpointManager, OptimizerState, RNGState


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--step-seconds", type=float, default=0.5, help="how long a step takes")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1), nn.Linear(256, 64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    config = CheckpointManager.Config(enable=True, interval=args.interval, keep_latest_k=3,
                                      async_mode="async_with_pinned_mem")
    manager = CheckpointManager(config, model_parts=[model], base_folder=args.out,
                                states={"optimizer": OptimizerState(model, optimizer), "rng": RNGState()})
    loaded = manager.load()
    print(f"resumed {loaded.step or 0}", flush=True)
    for step in range((loaded.step or 0) + 1, args.steps + 1):
        batch = torch.randn(32, 64)
        loss = (model(batch) - batch).pow(2).mean()
        loss.backward()
        time.sleep(args.step_seconds)  # the rest of a real step
        manager.maybe_wait_for_staging()
        optimizer.step()
        optimizer.zero_grad()
        result = manager.save(step, last_step=step == args.steps)
        print(f"step {step} {result.action}", flush=True)
    manager.close()


if __name__ == "__main__":
    main()
