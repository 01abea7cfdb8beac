"""Recovery as a user sees it: what memory snapshots cost a real run, and how long a crashed job
takes to train again, every figure read from the runs' own metrics.jsonl.

One command makes ``recovery_<gpu>.json`` (issue #27's keys):

- ``snapshot_cost``: for K in 2, 5, 10, the wall time of steps 40..160 with
  ``--checkpoint.memory_interval K`` over the same run without the tier, minus one (both with the
  same disk saves); ``snapshot_cost_spikes``: the same from the time steps spent above each run's
  own median step (immune to a machine whose speed drifts between runs);
- one run with the tier at K=5 (``--k``), with ``MAX_RESTARTS=1``: its worker is SIGKILLed
  after step 68 (``--kill-after-step``) and torchrun starts a new one, which restores from host
  memory: ``worker_crash_to_first_step_s`` (the kill to the first new step's record),
  ``restore_s`` / ``restore_bytes`` (its ``checkpoint_load`` record), ``steps_lost``;
  ``slowest_step_after_restart_over_median``: the slowest of the 20 steps after the first new one
  (``--steps-after``; the first's own time is in the kill-to-first-step figure) over the median
  step before the kill;
- then the whole job (torchrun and its worker) is SIGKILLed and the same command run again:
  ``job_kill_to_first_step_s``;
- then the whole job again, now with the snapshots gone and the checkpoint folder evicted from
  the page cache, so the same command restarts from the newest disk step read cold:
  ``cold_disk_restart_to_first_step_s`` and ``cold_disk_load_s``;
- each start's ``startup`` record (where its time went), and ``host``.

    python benchmarks/recovery_bench.py --out recovery_h200.json -- --config llama3_1b \\
        --training.local_batch_size 4

``--only throughput`` or ``--only restarts`` runs one half; ``--merge earlier.json`` keeps the
other half's keys from an earlier report (two device calls, one file).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import psutil  # noqa: E402

from disk_io import evict, files_under  # noqa: E402  (benchmarks/)
from run_stall import records, run_variant, split_run_flags, summarize  # noqa: E402

KEYS = ("snapshot_cost", "restore_s", "restore_bytes", "cold_disk_load_s", "worker_crash_to_first_step_s",
        "job_kill_to_first_step_s", "cold_disk_restart_to_first_step_s", "steps_lost", "k",
        "slowest_step_after_restart_over_median", "host")


def disk_flags(interval: int) -> list[str]:
    return ["--checkpoint.enable", "--checkpoint.interval", str(interval), "--checkpoint.no-last_save_model_only",
            "--checkpoint.async_mode", "async_with_pinned_mem", "--checkpoint.keep_latest_k", "2"]


def shm(folder: Path, name: str) -> Path:
    """A memory directory for run ``name``: in /dev/shm (a tmpfs), where the tier belongs."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else folder
    return base / f"cairn-recovery-bench-{os.getpid()}-{name}"


def throughput(common: list[str], folder: Path, args) -> dict[str, Any]:
    """The baseline and one run per K, one after another; snapshot_cost from their windows."""
    first, last = (int(x) for x in args.window.split(":"))
    variants = {"none": disk_flags(args.interval)}
    for k in args.ks:
        variants[f"k{k}"] = [*disk_flags(args.interval), "--checkpoint.memory_interval", str(k),
                             "--checkpoint.memory_dir", str(shm(folder, f"k{k}"))]
    results = {}
    for name, flags in variants.items():
        results[name] = run_variant(name, flags, common, folder, args.ngpu, args.timeout)
        shutil.rmtree(shm(folder, name), ignore_errors=True)
        print(f"{name}: exit {results[name]['returncode']} in {results[name]['wall_s']:.0f} s", flush=True)
    figures = summarize(results, first, last)
    out = {"window": [first, last], "figures": figures, "commands": {n: r["command"] for n, r in results.items()},
           "snapshot_cost": {}, "snapshot_cost_spikes": {}}
    base = figures.get("none", {})
    for k in args.ks:
        f = figures.get(f"k{k}", {})
        if "extra_fraction" in f:
            out["snapshot_cost"][str(k)] = round(f["extra_fraction"], 5)
            out["snapshot_cost_spikes"][str(k)] = round(f["spike_extra_s"] / base["window_s"], 5)
        else:
            out["snapshot_cost"][str(k)] = None
            out.setdefault("errors", {})[f"k{k}"] = f.get("error") or results[f"k{k}"].get("error")
    return out


class Job:
    """One ``run_train.sh`` launch (torchrun and its workers) of the restart scenario."""

    def __init__(self, command: list[str], env: dict, log: Path):
        self.log = open(log, "a")
        self.launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def workers(self) -> list[psutil.Process]:
        try:
            return [p for p in psutil.Process(self.launcher.pid).children(recursive=True)
                    if "cairn.train" in " ".join(p.cmdline())]
        except psutil.Error:
            return []

    def kill_workers(self) -> float:
        victims = self.workers()
        killed = time.time()
        for process in victims:
            os.kill(process.pid, signal.SIGKILL)
        return killed

    def kill_all(self) -> float:
        """SIGKILL torchrun and every process under it at once (a node's job ends). torchrun starts
        its workers in sessions of their own, so each is killed by its pid."""
        try:
            everyone = [psutil.Process(self.launcher.pid), *psutil.Process(self.launcher.pid).children(recursive=True)]
        except psutil.Error:
            everyone = []
        killed = time.time()
        for process in everyone:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(everyone, timeout=30)
        self.launcher.wait()
        self.log.close()
        return killed


def wait_for(dump: Path, predicate, timeout: float, job: Job) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = records_now(dump)
        if predicate(rows):
            return rows
        if job.launcher.poll() is not None:
            raise RuntimeError(f"the job ended (exit {job.launcher.returncode}) before it was expected to")
        time.sleep(0.01)
    raise RuntimeError("timed out waiting for the run")


def records_now(dump: Path) -> list[dict]:
    path = dump / "metrics.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line being written
                pass
    return out


def trained(rows: list[dict]) -> int:
    return max((r["step"] for r in rows if "loss" in r), default=0)


def after(rows: list[dict], moment: float) -> list[dict]:
    return [r for r in rows if r.get("time", 0) > moment]


def new_steps(rows: list[dict], moment: float) -> int:
    return sum(1 for r in after(rows, moment) if "loss" in r)


def restart_figures(rows: list[dict], killed: float, lost_from: int) -> dict[str, Any]:
    new = after(rows, killed)
    load = next(r for r in new if r.get("event") == "checkpoint_load")
    first = next(r for r in new if "loss" in r)
    startup = next((r for r in new if r.get("event") == "startup"), None)
    return {"to_first_step_s": round(first["time"] - killed, 3), "load": {k: load.get(k) for k in (
        "tier", "from_step", "steps_lost", "bytes", "seconds", "phases_s", "phases")},
            "trained_before_kill": lost_from, "steps_lost": lost_from - load["from_step"],
            "startup": {k: v for k, v in (startup or {}).items() if k not in ("event", "time")}}


def restarts(common: list[str], folder: Path, args) -> dict[str, Any]:
    dump = folder / "restart"
    shutil.rmtree(dump, ignore_errors=True)
    memory_dir = shm(folder, "restart")
    shutil.rmtree(memory_dir, ignore_errors=True)
    flags = [*disk_flags(args.interval), "--checkpoint.memory_interval", str(args.k),
             "--checkpoint.memory_dir", str(memory_dir), "--training.steps", "100000",
             "--job.dump_folder", str(dump)]
    command = [str(REPO / "run_train.sh"), *common, *flags]
    env = {**os.environ, "NGPU": str(args.ngpu), "MAX_RESTARTS": "1", "PYTHONUNBUFFERED": "1"}
    log = folder / "restart.log"
    log.unlink(missing_ok=True)
    out: dict[str, Any] = {"command": "MAX_RESTARTS=1 " + " ".join(shlex.quote(c) for c in command), "k": args.k}
    timeout = args.timeout

    # 1. a worker SIGKILLed after step N: torchrun starts a new one, which restores from memory
    job = Job(command, env, log)
    try:
        rows = wait_for(dump, lambda rows: trained(rows) >= args.kill_after_step, timeout, job)
        before = trained(rows)
        killed = job.kill_workers()
        rows = wait_for(dump, lambda rows: new_steps(rows, killed) >= args.steps_after + 1, timeout, job)
        crash = restart_figures(rows, killed, before)
        steady = [r["step_time_ms"] / 1e3 for r in rows if "step_time_ms" in r and r.get("time", 0) < killed
                  and r["step"] > min(10, args.kill_after_step // 2)]  # past the first steps' warm-up
        resumed = [r["step_time_ms"] / 1e3 for r in after(rows, killed) if "step_time_ms" in r][:args.steps_after + 1]
        median = statistics.median(steady)
        # the first step's own time (CUDA's lazy loading, the allocator's first blocks) is part of
        # kill-to-first-step; the ratio is over the steps after it
        crash.update(median_step_s=round(median, 4), steps_after_s=[round(s, 4) for s in resumed],
                     first_step_over_median=round(resumed[0] / median, 3),
                     slowest_over_median=round(max(resumed[1:]) / median, 3))
        out["worker_crash"] = crash

        # 2. the whole job SIGKILLed, the same command again: it restores from memory
        before = trained(rows)
        killed = job.kill_all()
        job = Job(command, {**env}, log)
        rows = wait_for(dump, lambda rows: new_steps(rows, killed) >= 3, timeout, job)
        out["job_kill"] = restart_figures(rows, killed, before)

        # 3. the whole job again, the snapshots gone and the folder out of the page cache: from disk, cold
        rows = wait_for(dump, lambda rows: any((dump / "checkpoint" / f"step-{r['step']}").is_dir()
                                               for r in rows if r.get("event") == "checkpoint_save"), timeout, job)
        before = trained(rows)
        killed = job.kill_all()
        shutil.rmtree(memory_dir, ignore_errors=True)
        evict(files_under(dump / "checkpoint"))
        out["evicted_after_kill_s"] = round(time.time() - killed, 3)
        job = Job(command, {**env}, log)
        rows = wait_for(dump, lambda rows: new_steps(rows, killed) >= 3, timeout, job)
        out["cold_disk"] = restart_figures(rows, killed, before)
        job.kill_all()
    finally:
        if job.launcher.poll() is None:
            job.kill_all()
        shutil.rmtree(memory_dir, ignore_errors=True)
        shutil.rmtree(dump / "checkpoint", ignore_errors=True)
    out["log_tail"] = log.read_text()[-4000:]
    crash, whole, cold = out["worker_crash"], out["job_kill"], out["cold_disk"]
    out.update(restore_s=crash["load"]["seconds"], restore_bytes=crash["load"]["bytes"],
               worker_crash_to_first_step_s=crash["to_first_step_s"], steps_lost=crash["steps_lost"],
               slowest_step_after_restart_over_median=crash["slowest_over_median"],
               job_kill_to_first_step_s=whole["to_first_step_s"],
               cold_disk_restart_to_first_step_s=cold["to_first_step_s"], cold_disk_load_s=cold["load"]["seconds"])
    return out


def host() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpus"] = torch.cuda.device_count()
    except ImportError:
        pass
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    return info


def main(argv: list[str]) -> None:
    argv, common = split_run_flags(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--folder", default="outputs/recovery_bench", help="dump folders (on the checkpoint disk)")
    parser.add_argument("--only", choices=("throughput", "restarts"), default=None)
    parser.add_argument("--merge", default=None, help="an earlier report whose keys this one keeps")
    parser.add_argument("--window", default="40:160")
    parser.add_argument("--ks", default="2,5,10", help="memory intervals of the throughput runs")
    parser.add_argument("--k", type=int, default=5, help="memory interval of the restart runs")
    parser.add_argument("--interval", type=int, default=50, help="disk save interval of every run")
    parser.add_argument("--kill-after-step", type=int, default=68)
    parser.add_argument("--steps-after", type=int, default=20, help="steps after a restart that are timed")
    parser.add_argument("--ngpu", type=int, default=1)
    parser.add_argument("--timeout", type=int, default=900)
    args = parser.parse_args(argv)
    args.ks = [int(k) for k in args.ks.split(",")]
    folder = Path(args.folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = json.loads(Path(args.merge).read_text()) if args.merge else {}
    report.update(host=host(), common_flags=common)
    if args.only in (None, "throughput"):
        # stopped after the window (not finished: no final save to wait for; the schedule is the same in every run)
        stop = ["--training.steps", "100000", "--debug.exit_after_step", str(int(args.window.split(":")[1]) + 2)]
        report["throughput"] = throughput(common + stop, folder, args)
        report["snapshot_cost"] = report["throughput"]["snapshot_cost"]
        report["snapshot_cost_spikes"] = report["throughput"]["snapshot_cost_spikes"]
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    if args.only in (None, "restarts"):
        try:
            report["restarts"] = restarts(common, folder, args)
            report.update({key: report["restarts"][key] for key in KEYS if key in report["restarts"]})
        except (RuntimeError, StopIteration, subprocess.TimeoutExpired, KeyError) as e:
            log = folder / "restart.log"
            report["restarts"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                                  "log_tail": log.read_text()[-6000:] if log.exists() else ""}
    Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    if "error" not in report.get("restarts", {}):
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({key: report.get(key) for key in KEYS}, indent=1, default=str))
    print(f"results: {Path(args.out).resolve()}")


if __name__ == "__main__":
    main(sys.argv[1:])
