"""Concurrent writers against one disk: does starting writeback as files are written help?

Each of ``--writers`` processes writes a file of ``--gb-per-writer`` GB sequentially and
fsyncs it, all starting together (as the ranks of one host do when they save); once with the
disk's writeback started every ``$CAIRN_WRITEBACK_MB`` as the bytes are written (what cairn's
writer does, ``start_writeback``) and once plainly (left to the kernel, as with
``CAIRN_WRITEBACK_MB=0``). The two variants alternate, the first of each repeat swapping, so
a drifting disk favours neither. Reported per writer count: the aggregate rate (all bytes /
the slowest writer's time to its fsync's return) of each variant, and their ratio.

    python benchmarks/writeback_bench.py --folder /data/bench --writers 1,2,4 --gb-per-writer 4 \
        --repeats 3 --out writeback.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout run without `pip install -e .`

from cairn.checkpoint.fsio import writeback_bytes  # noqa: E402
from disk_io import CHUNK, try_drop_caches, write_file  # noqa: E402  (benchmarks/)


def _writer(path: str, nbytes: int, writeback: bool, start, results) -> None:
    block = os.urandom(CHUNK)
    start.wait()
    results.put(write_file(Path(path), nbytes, block, writeback=writeback)["fsync_s"])


def one_round(folder: Path, writers: int, nbytes: int, writeback: bool, drop_caches: bool) -> dict[str, Any]:
    """``writers`` processes write and fsync ``nbytes`` each, together: the slowest one's time."""
    context = multiprocessing.get_context("fork")  # the parent has run no torch op: nothing to inherit but imports
    start, results = context.Barrier(writers + 1), context.Queue()
    procs = [context.Process(target=_writer, args=(str(folder / f"w{i}.bin"), nbytes, writeback, start, results))
             for i in range(writers)]
    for proc in procs:
        proc.start()
    start.wait()
    times = [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"a writer process exited with {proc.exitcode}")
    for path in folder.glob("w*.bin"):
        path.unlink()
    dropped = drop_caches and try_drop_caches()
    return {"seconds": max(times), "per_writer_s": times, "gbps": writers * nbytes / max(times) / 1e9,
            "cache_dropped": dropped}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default="outputs/writeback_bench", help="a folder on the disk to measure")
    parser.add_argument("--writers", default="1,2,4", help="concurrent writer processes, comma-separated counts")
    parser.add_argument("--gb-per-writer", type=float, default=4.0, help="bytes each writer writes, GB")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per variant and writer count")
    parser.add_argument("--drop-caches", choices=("auto", "never"), default="auto",
                        help="drop the page cache between rounds where permitted (auto) or not (never)")
    parser.add_argument("--out", default=None, help="JSON results")
    args = parser.parse_args(argv)
    try:
        counts = [int(x) for x in args.writers.split(",")]
    except ValueError:
        parser.error(f"--writers: expected comma-separated integers, got {args.writers!r}")
    if any(n < 1 for n in counts):
        parser.error(f"--writers: counts must be >= 1, got {args.writers!r}")
    if args.gb_per_writer <= 0 or args.repeats < 1:
        parser.error("--gb-per-writer must be > 0 and --repeats >= 1")
    every = writeback_bytes()
    if every == 0:
        parser.error("CAIRN_WRITEBACK_MB=0 turns writeback off: nothing to compare (unset it)")
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    nbytes = int(args.gb_per_writer * 1e9) // CHUNK * CHUNK
    drop = args.drop_caches == "auto"
    if drop:
        try_drop_caches()
    report: dict[str, Any] = {
        "host": {"hostname": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(),
                 "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())},
        "config": {"argv": sys.argv[1:] if argv is None else argv, "folder": str(folder.resolve()),
                   "bytes_per_writer": nbytes, "writeback_bytes": every},
        "writers": {},
    }
    for writers in counts:
        rounds: dict[str, list[dict]] = {"writeback": [], "plain": []}
        for repeat in range(args.repeats):
            order = ("writeback", "plain") if repeat % 2 == 0 else ("plain", "writeback")
            for variant in order:
                rounds[variant].append(one_round(folder, writers, nbytes, variant == "writeback", drop))
        pairs = [a["seconds"] / b["seconds"] for a, b in zip(rounds["writeback"], rounds["plain"])]
        summary = {variant: statistics.median(r["gbps"] for r in rs) for variant, rs in rounds.items()}
        report["writers"][str(writers)] = {
            "gbps_writeback": summary["writeback"], "gbps_plain": summary["plain"],
            "time_ratio_writeback_over_plain": statistics.median(pairs), "time_ratio_per_repeat": pairs,
            "rounds": rounds}
        print(f"{writers} writer(s) x {nbytes / 1e9:.1f} GB: writeback {summary['writeback']:.2f} GB/s, "
              f"plain {summary['plain']:.2f} GB/s; time writeback / plain {statistics.median(pairs):.3f} "
              f"(per repeat {', '.join(f'{p:.3f}' for p in pairs)})", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
