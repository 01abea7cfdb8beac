"""When a save comes due while the previous one is still being written: wait, coalesce, defer.

A plain loop (an MLP and AdamW, one process, as a library user writes it from the guide's
section 16) runs the same steps once without checkpoints and once per ``when_busy`` mode, with
async saves every ``--interval`` steps that take longer than the interval to write. Per mode:

- ``steps_per_s`` and ``throughput``: steps per second over the timed steps, and that over the
  run without checkpoints (what the mode costs training);
- ``stall_s``: the seconds ``save()`` held the loop, in all;
- ``at_risk_max`` / ``at_risk_mean``: the steps a crash right after each step would lose (the
  steps since the newest committed full step, ``SaveResult.steps_at_risk``), the most and
  the mean over the timed steps;
- ``committed``: the steps on disk at the end; ``actions``: what each save() did.

    python benchmarks/when_busy_bench.py --out when_busy.json                # the model's own writes
    python benchmarks/when_busy_bench.py --out when_busy.json --commit-delay 1.5 --step-seconds 0.25
    # a disk that takes 1.5 s more per save, at a GPU-like 0.25 s a step

Modes run in turns (``--repeats``), so a machine whose speed drifts affects them alike. Saves
are written from a thread by default (``--async-writer``): each run is a new manager, and the
default writer process takes seconds to start, once per run, which would land in the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

MODES = ("wait", "coalesce", "defer")


def build(width: int, layers: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(layers)])
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def run(mode: str | None, args, folder: Path) -> dict:
    """One run of ``args.steps`` steps; ``mode`` None: no checkpoints."""
    from cairn.checkpoint import CheckpointManager, OptimizerState, list_steps

    model, optimizer = build(args.width, args.layers)
    manager = None
    if mode is not None:
        config = CheckpointManager.Config(enable=True, interval=args.interval, keep_latest_k=2,
                                          async_mode="async_with_pinned_mem", when_busy=mode,
                                          async_writer=args.async_writer, last_save_model_only=False)
        manager = CheckpointManager(config, model_parts=[model], base_folder=folder,
                                    states={"optimizer": OptimizerState(model, optimizer)})
    batch = torch.randn(args.batch, args.width)
    times, stalls, at_risk, actions = [], [], [], {}
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        loss = model(batch).pow(2).mean()
        loss.backward()
        if args.step_seconds:
            time.sleep(args.step_seconds)
        if manager is not None:
            manager.maybe_wait_for_staging()
        optimizer.step()
        optimizer.zero_grad()
        if manager is not None:
            if step == 1:  # the buffers are made after the first step, before any save is due
                manager.prepare_async()
                for saver in (manager.async_saver, getattr(manager, "_spare", None)):
                    if saver is not None:
                        saver.wait()
            before = time.perf_counter()
            result = manager.save(step)
            stalls.append(time.perf_counter() - before)
            if step > args.warmup:
                at_risk.append(result.steps_at_risk)
                actions[result.action] = actions.get(result.action, 0) + 1
        times.append(time.perf_counter() - start)
    committed = []
    if manager is not None:
        manager.close()
        committed = list_steps(folder / "checkpoint")
    timed = times[args.warmup:]
    out = {"steps_per_s": len(timed) / sum(timed), "step_s_median": statistics.median(timed)}
    if manager is not None:
        out.update(stall_s=sum(stalls[args.warmup:]), at_risk_max=max(at_risk),
                   at_risk_mean=statistics.fmean(at_risk), committed=committed, actions=actions)
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON results")
    parser.add_argument("--width", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=8, help="the state is about 12 * width^2 * layers bytes")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the figures")
    parser.add_argument("--interval", type=int, default=2)
    parser.add_argument("--step-seconds", type=float, default=0.0, help="extra time per step (a GPU-like step)")
    parser.add_argument("--commit-delay", type=float, default=0.0, help="extra seconds per save (a slow disk)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--async-writer", default="thread", choices=("thread", "process"),
                        help="thread: the writer process's start (seconds, once per run) stays out of the figures")
    parser.add_argument("--folder", default=None, help="where the checkpoints go (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.commit_delay:
        os.environ["CAIRN_FAULT"] = f"after_data_before_commit:sleep={args.commit_delay}"
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    root = Path(args.folder or tempfile.mkdtemp(prefix="when_busy_"))
    runs: dict[str, list[dict]] = {name: [] for name in ("none", *MODES)}
    for turn in range(args.repeats):
        order = ("none", *MODES) if turn % 2 == 0 else ("none", *reversed(MODES))
        for name in order:
            folder = root / f"{name}-{turn}"
            runs[name].append(run(None if name == "none" else name, args, folder))
            shutil.rmtree(folder, ignore_errors=True)
            print(f"turn {turn} {name}: {json.dumps(runs[name][-1])}", flush=True)
    baseline = statistics.fmean(r["steps_per_s"] for r in runs["none"])
    summary = {}
    for name in MODES:
        rows = runs[name]
        summary[name] = {"steps_per_s": statistics.fmean(r["steps_per_s"] for r in rows),
                         "throughput": statistics.fmean(r["steps_per_s"] for r in rows) / baseline,
                         "stall_s": statistics.fmean(r["stall_s"] for r in rows),
                         "at_risk_max": max(r["at_risk_max"] for r in rows),
                         "at_risk_mean": statistics.fmean(r["at_risk_mean"] for r in rows),
                         "committed": rows[-1]["committed"], "actions": rows[-1]["actions"]}
    state_mb = 12 * args.width * (args.width + 1) * args.layers / 1e6
    report = {"args": vars(args), "state_mb": round(state_mb, 1), "baseline_steps_per_s": baseline,
              "summary": summary, "runs": runs, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
              "torch": torch.__version__, "cpus": os.cpu_count()}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"state {state_mb:.0f} MB, interval {args.interval}, {args.steps - args.warmup} timed steps; "
          f"without checkpoints {baseline:.2f} steps/s")
    print(f"{'when_busy':<10}{'steps/s':>9}{'throughput':>12}{'stall s':>9}{'at risk max':>13}{'mean':>7}  committed")
    for name, row in summary.items():
        print(f"{name:<10}{row['steps_per_s']:>9.2f}{row['throughput']:>12.3f}{row['stall_s']:>9.2f}"
              f"{row['at_risk_max']:>13}{row['at_risk_mean']:>7.1f}  {row['committed']}")
    if args.folder is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
