"""A transformers model in a plain loop, checkpointed by cairn, its final weights exported as
Hugging Face safetensors that ``from_pretrained`` loads.

    python examples/hf_model_loop.py --out /tmp/hf_loop                # train, save every 4 steps
    python examples/hf_model_loop.py --out /tmp/hf_loop --kill-at 6    # ... killed after step 6
    python examples/hf_model_loop.py --out /tmp/hf_loop                # resumes, bit for bit
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('/tmp/hf_loop/checkpoint/step-12')"

A small ``LlamaForCausalLM`` is built from a config (no download), trained with AdamW in one
process (no process group needed), checkpointed with ``CheckpointManager`` and an async save
mode; the last step is written as Hugging Face safetensors + ``config.json`` through
``TransformersAdapter`` (the model's own keys). ``<out>/final.json`` holds a hash of every
weight, and the losses go to ``<out>/losses.jsonl``, for comparing runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
from pathlib import Path

import torch
from torch.distributed.checkpoint.stateful import Stateful
from transformers import LlamaConfig, LlamaForCausalLM

from cairn.checkpoint import CheckpointManager, OptimizerState, RNGState, TransformersAdapter


class Batches(Stateful):
    """Random token batches; the generator state is the data position."""

    def __init__(self, seed: int, vocab: int, batch: int = 4, seq: int = 16):
        self.generator = torch.Generator().manual_seed(seed)
        self.vocab, self.batch, self.seq = vocab, batch, seq

    def next(self) -> torch.Tensor:
        return torch.randint(0, self.vocab, (self.batch, self.seq), generator=self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.generator.set_state(state_dict["generator"])


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attention_dropout=0.1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def weight_hashes(state: dict) -> dict[str, str]:
    return {key: hashlib.sha256(value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for key, value in sorted(state.items())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--async-mode", default="async", choices=("disabled", "async", "async_with_pinned_mem"))
    parser.add_argument("--kill-at", type=int, default=0,
                        help="after this step, once the save in flight is committed, SIGKILL this process")
    args = parser.parse_args()

    model = tiny_llama()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = Batches(seed=7, vocab=model.config.vocab_size)
    torch.manual_seed(1234)  # attention dropout draws from here; RNGState saves and restores it
    config = CheckpointManager.Config(enable=True, interval=args.interval, keep_latest_k=2, async_mode=args.async_mode,
                                      last_save_model_only=True, last_save_in_hf=True, export_dtype="float32")
    manager = CheckpointManager(config, model_parts=model, base_folder=args.out,
                                states={"optimizer": OptimizerState(model, optimizer), "data": data,
                                        "rng": RNGState()},
                                sd_adapter=TransformersAdapter(model), total_steps=args.steps)
    loaded = manager.load()  # a LoadResult: what was restored (step, tier, source); false on a fresh start
    if loaded:
        print(f"resumed from step {loaded.step} ({loaded.source})", flush=True)
    losses = Path(args.out) / "losses.jsonl"
    for step in range((loaded.step or 0) + 1, args.steps + 1):
        tokens = data.next()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        manager.maybe_wait_for_staging()
        optimizer.step()
        optimizer.zero_grad()
        with open(losses, "a") as f:
            f.write(json.dumps({"step": step, "loss": loss.item()}) + "\n")
        manager.save(step, last_step=step == args.steps)
        if step == args.kill_at:
            if manager.last_save is not None:
                manager.last_save.result()
            os.kill(os.getpid(), signal.SIGKILL)
    manager.close()
    export = Path(manager.store.step_url(args.steps))
    (Path(args.out) / "final.json").write_text(json.dumps({"weights": weight_hashes(model.state_dict()),
                                                           "export": str(export)}))
    print(f"done at step {args.steps}; Hugging Face export in {export}", flush=True)


if __name__ == "__main__":
    main()
