"""What a failure costs: SIGKILL of the trainer to its first new step after torchrun restarts it,
resuming from the memory tier, from a warm disk and from a cold disk; then goodput per hour.

Per tier, one ``./run_train.sh`` run with ``MAX_RESTARTS=1`` (torchrun ``--max-restarts 1``):
once a checkpoint of the tier is committed and the run has trained ``--kill-after`` more steps,
every training process is SIGKILLed; torchrun starts new ones, which resume. For the cold disk
the checkpoint folder's files are evicted from the page cache (``posix_fadvise(DONTNEED)``,
flushed first) right after the kill, before the new processes start reading; the libraries
stay cached, as on a restart in place. From the restarted run's own records:

- ``detect_s``: kill to the new training process's start (torchrun noticing and relaunching;
  the start as this script sees it, polling every 2 ms);
- ``init_s``: process start to the start of the load (imports, process group, model, optimizer);
- ``restore_s``: the load (the ``checkpoint_load`` record's ``seconds``);
- ``first_step_s``: the load's end to the first new step's record;
- ``total_s``: kill to that record; ``steps_lost``: the newest step trained before the kill
  minus the step resumed from.

Goodput for one failure every ``--mtbf`` seconds (the expected waste of checkpoint cost, lost
work and restart; each tier at the interval that minimizes it, Young/Daly
``sqrt(2 * cost * mtbf)``, and at the interval it ran with) needs each tier's cost per
checkpoint: give run_stall.py's JSON with ``--stall-json`` (per variant named in ``--cost``, its
``spike_extra_per_checkpoint_s``, else ``extra_per_snapshot_s`` / ``extra_per_save_s``).

    python benchmarks/restart_bench.py --out restart.json -- --training.steps 200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import psutil  # noqa: E402

from disk_io import evict, files_under  # noqa: E402  (benchmarks/)
from run_stall import split_run_flags  # noqa: E402


# A checkpoint's cost from run_stall.py's figures, first found: the stalls above the run's own
# median step (immune to run-to-run drift of the machine), else the window against the baseline's.
COST_KEYS = ("spike_extra_per_checkpoint_s", "extra_per_snapshot_s", "extra_per_save_s")


def tiers(interval: int) -> dict[str, list[str]]:
    common = ["--checkpoint.enable", "--checkpoint.no-last_save_model_only", "--checkpoint.keep_latest_k", "2"]
    disk = [*common, "--checkpoint.interval", str(interval), "--checkpoint.async_mode", "async_with_pinned_mem"]
    return {"memory": [*common, "--checkpoint.interval", "100000", "--checkpoint.memory_interval", str(interval)],
            "disk_warm": disk, "disk_cold": disk}


def records(dump: Path) -> list[dict[str, Any]]:
    path = dump / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written
            pass
    return out


def workers(launcher: psutil.Process) -> list[psutil.Process]:
    try:
        return [p for p in launcher.children(recursive=True) if "cairn.train" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def run_tier(name: str, flags: list[str], common: list[str], folder: Path, args) -> dict[str, Any]:
    dump = folder / name
    shutil.rmtree(dump, ignore_errors=True)
    memory_dir = folder / f"{name}-shm"
    if name == "memory":
        flags = [*flags, "--checkpoint.memory_dir", str(memory_dir)]
    env = {**os.environ, "NGPU": str(args.ngpu), "MAX_RESTARTS": "1", "PYTHONUNBUFFERED": "1"}
    command = [str(REPO / "run_train.sh"), *common, *flags, "--job.dump_folder", str(dump)]
    log = open(folder / f"{name}.log", "w")
    launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    out: dict[str, Any] = {"flags": flags, "command": " ".join(shlex.quote(c) for c in command)}
    event = "memory_snapshot" if name == "memory" else "checkpoint_save"
    try:
        deadline = time.monotonic() + args.timeout
        kill_at = None
        while time.monotonic() < deadline and launcher.poll() is None:
            rows = records(dump)
            saved = [r["step"] for r in rows if r.get("event") == event and not r.get("skipped")]
            trained = max((r["step"] for r in rows if "loss" in r), default=0)
            committed = name == "memory" or any((dump / "checkpoint" / f"step-{s}").is_dir() for s in saved)
            if saved and committed and kill_at is None:
                kill_at = trained + args.kill_after
            if kill_at is not None and trained >= kill_at:
                break
            time.sleep(0.02)
        else:
            raise RuntimeError(f"{name}: the run ended or timed out before it could be killed")
        old = workers(psutil.Process(launcher.pid))
        trained = max(r["step"] for r in records(dump) if "loss" in r)
        killed_at = time.time()
        for process in old:
            os.kill(process.pid, signal.SIGKILL)
        if name == "disk_cold":
            evict(files_under(dump / "checkpoint"))
            out["evicted_after_s"] = time.time() - killed_at
        old_pids = {p.pid for p in old}
        started = None
        while started is None and time.monotonic() < deadline and launcher.poll() is None:
            # seen within a few ms of its start (a process's create_time is only as exact as the boot time, 1 s)
            if any(p.pid not in old_pids for p in workers(psutil.Process(launcher.pid))):
                started = time.time()
            time.sleep(0.002)
        launcher.wait(timeout=max(1, deadline - time.monotonic()))
        rows = [r for r in records(dump) if r.get("time", 0) > killed_at]
        load = next(r for r in rows if r.get("event") == "checkpoint_load")
        first = next(r for r in rows if "loss" in r)
        load_start = load["time"] - load["seconds"]
        out.update(returncode=launcher.returncode, trained_before_kill=trained, from_step=load["from_step"],
                   tier=load.get("tier"), steps_lost=trained - load["from_step"], bytes=load.get("bytes"),
                   detect_s=started - killed_at, init_s=load_start - started, restore_s=load["seconds"],
                   restore_phases_s=load.get("phases_s"),
                   first_step_s=first["time"] - load["time"], total_s=first["time"] - killed_at,
                   median_step_s=median([r["step_time_ms"] / 1e3 for r in records(dump) if "step_time_ms" in r]))
    finally:
        if launcher.poll() is None:
            launcher.kill()
        log.close()
        shutil.rmtree(dump / "checkpoint", ignore_errors=True)
        shutil.rmtree(memory_dir, ignore_errors=True)
    return out


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else float("nan")


def goodput(cost_s: float, restart_s: float, step_s: float, mtbf_s: float, interval_steps: int | None) -> dict:
    """Fraction of time that trains, for one failure per ``mtbf_s``: a checkpoint every ``T`` s costs
    ``cost_s``; a failure loses ``T / 2`` of work on average and ``restart_s``."""
    best = math.sqrt(2 * max(cost_s, 1e-9) * mtbf_s)
    out = {}
    for label, period in (("best", max(step_s, best)),
                          *((("as_run", interval_steps * step_s),) if interval_steps else ())):
        waste = cost_s / period + (period / 2 + restart_s) / mtbf_s
        out[label] = {"interval_s": period, "interval_steps": period / step_s, "goodput": 1 - waste,
                      "lost_work_s": period / 2, "checkpoint_cost_per_hour_s": 3600 * cost_s / period}
    return out


def main(argv: list[str]) -> None:
    argv, common = split_run_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--folder", default="outputs/restart_bench", help="dump folders (on the checkpoint disk)")
    parser.add_argument("--interval", type=int, default=10, help="steps between checkpoints of every tier")
    parser.add_argument("--kill-after", type=int, default=5, help="steps trained after a checkpoint, then SIGKILL")
    parser.add_argument("--only", default=None, help="comma-separated tiers (memory, disk_warm, disk_cold)")
    parser.add_argument("--ngpu", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--mtbf", type=float, default=3600.0, help="seconds between failures, for goodput")
    parser.add_argument("--stall-json", default=None, help="run_stall.py's JSON: each tier's cost per checkpoint")
    parser.add_argument("--cost", action="append", default=[], metavar="TIER=VARIANT",
                        help="the run_stall variant whose cost per checkpoint a tier pays, e.g. memory=memory_k10, "
                             "or that cost in seconds, e.g. memory=0.007")
    parser.add_argument("--from-json", default=None,
                        help="take the tiers' restarts from this earlier report instead of running them "
                             "(to compute goodput with other costs)")
    args = parser.parse_args(argv)
    chosen = tiers(args.interval)
    if args.only:
        unknown = set(args.only.split(",")) - set(chosen)
        if unknown:
            parser.error(f"--only: unknown tier(s) {sorted(unknown)}; choose from {', '.join(chosen)}")
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    folder = Path(args.folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"common_flags": common, "interval": args.interval, "kill_after": args.kill_after,
                              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "tiers": {}}
    if args.from_json:
        report["tiers"] = json.loads(Path(args.from_json).read_text())["tiers"]
        report["from_json"] = args.from_json
        chosen = {}
    for name, flags in chosen.items():
        try:
            report["tiers"][name] = run_tier(name, flags, common, folder, args)
        except (RuntimeError, StopIteration, subprocess.TimeoutExpired) as e:
            report["tiers"][name] = {"error": str(e) or type(e).__name__,
                                     "log": (folder / f"{name}.log").read_text()[-3000:]}
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    if args.cost:
        figures = json.loads(Path(args.stall_json).read_text())["figures"] if args.stall_json else {}
        report["goodput"] = {}
        for spec in args.cost:
            tier, _, variant = spec.partition("=")
            row, f = report["tiers"].get(tier, {}), figures.get(variant, {})
            try:
                cost = float(variant)
            except ValueError:
                cost = next((f[key] for key in COST_KEYS if f.get(key) is not None), None)
            if "total_s" not in row or cost is None:
                continue
            report["goodput"][tier] = {"cost_variant": variant, "cost_per_checkpoint_s": cost,
                                       "restart_s": row["total_s"], "mtbf_s": args.mtbf,
                                       **goodput(max(cost, 0.0), row["total_s"], row["median_step_s"], args.mtbf,
                                                 args.interval)}
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    shutil.rmtree(folder, ignore_errors=True)
    print(f"{'tier':<11}{'lost':>5}{'detect':>8}{'init':>7}{'restore':>9}{'1st step':>9}{'total s':>9}")
    for name, row in report["tiers"].items():
        if "error" in row:
            print(f"{name:<11} error: {row['error']}")
            continue
        print(f"{name:<11}{row['steps_lost']:>5}{row['detect_s']:>8.2f}{row['init_s']:>7.2f}{row['restore_s']:>9.3f}"
              f"{row['first_step_s']:>9.2f}{row['total_s']:>9.2f}")
    for name, row in report.get("goodput", {}).items():
        best = row["best"]
        print(f"goodput {name}: {best['goodput']:.4f} at a checkpoint every {best['interval_s']:.1f} s "
              f"({row['cost_per_checkpoint_s']:.3f} s each, restart {row['restart_s']:.1f} s, one failure per "
              f"{row['mtbf_s']:.0f} s)")
    print(f"results: {Path(args.out).resolve()}")


if __name__ == "__main__":
    main(sys.argv[1:])
