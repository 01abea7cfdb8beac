"""What checkpointing costs a real run, read from the run's own metrics.jsonl.

Runs ``./run_train.sh`` once per variant (the same model, batch and steps; only the checkpoint
flags differ), one after another on this machine, and compares each run's wall-clock time over
a window of steps (``time`` of the window's last step record minus that of its first) with the
same window of the run without checkpoints. Everything a user would see is in that figure:
saves blocking, staging, retention deleting old steps on the same disk, a save coming due
while the previous one is still written. Per variant it reports the extra time over the
window, per save in it, the slowest step against the baseline's median step, and the
``checkpoint_save`` / ``checkpoint_deferred`` records (``stall_s``, ``waited_s``,
``deferred_steps``), and the memory tier's ``memory_snapshot`` records (extra time per
snapshot, the fraction of the baseline's window). On a machine whose speed drifts from run to
run, ``spike_extra_s`` compares only the time steps spent above each run's own median step
(the stalls around each checkpoint, not a uniform slowdown).

    python benchmarks/run_stall.py --out stall.json -- --config llama3_1b --training.local_batch_size 4 \\
        --training.steps 165
    # default variants: none; async_with_pinned_mem with keep_latest_k 0 and 1; async and
    # disabled (sync) with keep_latest_k 1; every save back to back (an interval shorter than a save)

Flags after ``--`` go to every run; ``--variant name=FLAGS`` (repeatable) replaces the default
variants, ``--window A:B`` picks the steps, ``--interval N`` the save interval of the defaults.

``--when-busy wait,coalesce,defer`` runs instead one variant per ``--checkpoint.when_busy``
mode (async_with_pinned_mem, keep_latest_k 1, saves every ``--interval`` steps: pick one
shorter than a save takes, so that saves come due while one is written) and reports, besides
the extra time, the steps a crash would lose, from each step record's ``steps_at_risk``
(``at_risk_max``, ``at_risk_mean``), and the saves taken, deferred or coalesced:

    python benchmarks/run_stall.py --out when_busy.json --when-busy wait,coalesce,defer --interval 10 \\
        --window 30:120 -- --config llama3_1b --training.local_batch_size 4 --training.steps 125
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def default_variants(interval: int, b2b_interval: int) -> dict[str, list[str]]:
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", str(interval), "--checkpoint.no-last_save_model_only"]
    return {
        "none": [],
        "pinned_keep0": [*ckpt, "--checkpoint.async_mode", "async_with_pinned_mem", "--checkpoint.keep_latest_k", "0"],
        "pinned_keep1": [*ckpt, "--checkpoint.async_mode", "async_with_pinned_mem", "--checkpoint.keep_latest_k", "1"],
        "async_keep1": [*ckpt, "--checkpoint.async_mode", "async", "--checkpoint.keep_latest_k", "1"],
        "sync_keep1": [*ckpt, "--checkpoint.async_mode", "disabled", "--checkpoint.keep_latest_k", "1"],
        "pinned_back_to_back": ["--checkpoint.enable", "--checkpoint.interval", str(b2b_interval),
                                "--checkpoint.no-last_save_model_only", "--checkpoint.async_mode",
                                "async_with_pinned_mem", "--checkpoint.keep_latest_k", "1"],
    }


def when_busy_variants(modes: list[str], interval: int) -> dict[str, list[str]]:
    ckpt = ["--checkpoint.enable", "--checkpoint.interval", str(interval), "--checkpoint.no-last_save_model_only",
            "--checkpoint.async_mode", "async_with_pinned_mem", "--checkpoint.keep_latest_k", "1"]
    return {"none": [], **{f"when_busy_{mode}": [*ckpt, "--checkpoint.when_busy", mode] for mode in modes}}


def records(dump: Path) -> list[dict[str, Any]]:
    path = dump / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def window_figures(rows: list[dict[str, Any]], first: int, last: int) -> dict[str, Any]:
    steps = {r["step"]: r for r in rows if "event" not in r and "step_time_ms" in r}
    if first not in steps or last not in steps:
        return {"error": f"the run did not log steps {first} and {last}"}
    inside = [steps[s]["step_time_ms"] / 1e3 for s in range(first + 1, last + 1) if s in steps]
    saves = [r for r in rows if r.get("event") == "checkpoint_save" and first <= r["step"] < last]
    deferred = [r for r in rows if r.get("event") == "checkpoint_deferred" and first <= r["step"] < last]
    snapshots = [r for r in rows if r.get("event") == "memory_snapshot" and first <= r["step"] < last]
    median = statistics.median(inside)
    at_risk = [steps[s]["steps_at_risk"] for s in range(first + 1, last + 1) if "steps_at_risk" in steps.get(s, {})]
    return {"window_s": steps[last]["time"] - steps[first]["time"], "steps": last - first,
            "at_risk_max": max(at_risk) if at_risk else None,
            "at_risk_mean": statistics.fmean(at_risk) if at_risk else None,
            "median_step_s": median, "max_step_s": max(inside),
            # the time steps spent above this run's own median step: stalls, not a uniform slowdown,
            # and immune to the machine running all steps of one run faster than another's
            "above_median_s": sum(t - median for t in inside if t > median),
            "saves": [{k: r.get(k) for k in ("step", "kind", "stall_s", "waited_s", "deferred_steps", "bytes",
                                             "action", "steps_at_risk")} for r in saves],
            "deferred": [{k: r.get(k) for k in ("step", "due_step", "action", "steps_at_risk")} for r in deferred],
            "snapshots": [{k: r.get(k) for k in ("step", "stall_s", "bytes")} for r in snapshots],
            "snapshots_skipped": sum(1 for r in rows if r.get("event") == "memory_snapshot_skipped"
                                     and first <= r["step"] < last)}


def run_variant(name: str, flags: list[str], common: list[str], folder: Path, ngpu: int, timeout: int) -> dict:
    dump = folder / name
    shutil.rmtree(dump, ignore_errors=True)
    env = {**os.environ, "NGPU": str(ngpu), "PYTHONUNBUFFERED": "1"}
    command = [str(REPO / "run_train.sh"), *common, *flags, "--job.dump_folder", str(dump)]
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = {"flags": flags, "returncode": proc.returncode, "wall_s": time.perf_counter() - start,
           "command": " ".join(shlex.quote(c) for c in command)}
    if proc.returncode != 0:
        out["error"] = (proc.stdout + proc.stderr)[-3000:]
    out["records"] = records(dump)
    log = [line for line in (proc.stdout + proc.stderr).splitlines()
           if any(word in line for word in ("checkpoint step", "retention", "deferred", "WARNING"))]
    out["log"] = log[-60:]
    shutil.rmtree(dump / "checkpoint", ignore_errors=True)  # the disk holds one run's checkpoints at a time
    return out


def summarize(results: dict[str, dict], first: int, last: int) -> dict[str, Any]:
    figures = {name: window_figures(r["records"], first, last) for name, r in results.items()}
    base = figures.get("none", {})
    for name, f in figures.items():
        if "error" in f or "window_s" not in base or name == "none":
            continue
        f["extra_s"] = f["window_s"] - base["window_s"]
        count = len(f["saves"]) + len(f["deferred"])
        f["extra_per_save_s"] = f["extra_s"] / len(f["saves"]) if f["saves"] else None
        f["extra_per_snapshot_s"] = f["extra_s"] / len(f["snapshots"]) if f["snapshots"] and not f["saves"] else None
        f["extra_fraction"] = f["extra_s"] / base["window_s"]
        f["spike_extra_s"] = f["above_median_s"] - base["above_median_s"]
        checkpoints = len(f["saves"]) or len(f["snapshots"])
        f["spike_extra_per_checkpoint_s"] = f["spike_extra_s"] / checkpoints if checkpoints else None
        f["due_saves"] = count
        f["slowest_step_over_baseline_median_s"] = f["max_step_s"] - base["median_step_s"]
    return figures


def table(figures: dict[str, dict], first: int, last: int) -> str:
    lines = [f"window: steps {first}..{last} (wall clock between their metrics records)",
             f"{'variant':<22}{'window s':>10}{'extra s':>9}{'saves':>7}{'extra/ckpt':>12}{'slowest step':>14}"
             f"{'deferred':>10}{'snapshots':>11}{'extra %':>9}{'at risk max':>13}{'mean':>7}"]
    for name, f in figures.items():
        if "error" in f:
            lines.append(f"{name:<22}  error: {f['error']}")
            continue
        extra = f.get("extra_s")
        per = f.get("extra_per_save_s") if f.get("saves") else f.get("extra_per_snapshot_s")
        lines.append(f"{name:<22}{f['window_s']:>10.2f}{'' if extra is None else f'{extra:+.2f}':>9}"
                     f"{len(f['saves']):>7}{'' if per is None else f'{per:+.3f}':>12}{f['max_step_s']:>14.3f}"
                     f"{len(f['deferred']):>10}{len(f.get('snapshots', [])):>11}"
                     f"{'' if extra is None else format(100 * f['extra_fraction'], '+.2f'):>9}"
                     f"{'' if f.get('at_risk_max') is None else f['at_risk_max']:>13}"
                     f"{'' if f.get('at_risk_mean') is None else format(f['at_risk_mean'], '.1f'):>7}")
    return "\n".join(lines)


def split_run_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """(this script's arguments, the flags after ``--`` that go to every run)."""
    if "--" not in argv:
        return argv, []
    split = argv.index("--")
    return argv[:split], argv[split + 1:]


def main(argv: list[str]) -> None:
    argv, common = split_run_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON results")
    parser.add_argument("--folder", default="outputs/run_stall", help="dump folders (on the checkpoint disk)")
    parser.add_argument("--window", default="40:160", help="first:last step of the timed window")
    parser.add_argument("--interval", type=int, default=50, help="save interval of the default variants")
    parser.add_argument("--b2b-interval", type=int, default=10, help="save interval of the back-to-back variant")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                        help="a variant's checkpoint flags (replaces the defaults; 'none' is the baseline)")
    parser.add_argument("--only", default=None, help="comma-separated default variants to run")
    parser.add_argument("--when-busy", default=None, metavar="MODES",
                        help="comma-separated --checkpoint.when_busy modes: one variant each (replaces the defaults)")
    parser.add_argument("--ngpu", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    args = parser.parse_args(argv)
    first, last = (int(x) for x in args.window.split(":"))
    if args.variant:
        variants = {spec.partition("=")[0]: shlex.split(spec.partition("=")[2]) for spec in args.variant}
    elif args.when_busy:
        variants = when_busy_variants(args.when_busy.split(","), args.interval)
    else:
        variants = default_variants(args.interval, args.b2b_interval)
        if args.only:
            variants = {k: v for k, v in variants.items() if k in args.only.split(",") or k == "none"}
    folder = Path(args.folder).resolve()
    results: dict[str, dict] = {}
    report: dict[str, Any] = {"common_flags": common, "window": [first, last], "runs": results,
                              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for name, flags in variants.items():
        results[name] = run_variant(name, flags, common, folder, args.ngpu, args.timeout)
        report["figures"] = summarize(results, first, last)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))  # partial results survive
        print(f"{name}: exit {results[name]['returncode']}, {results[name]['wall_s']:.0f} s", flush=True)
    report["figures"] = summarize(results, first, last)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    shutil.rmtree(folder, ignore_errors=True)
    print(table(report["figures"], first, last), flush=True)
    print(f"results: {Path(args.out).resolve()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
