"""The checkpoint storage layer alone against the disk: write and read paths, no training.

Saves one host-memory state dict (fp32 tensors shaped like a model's: one large embedding-like
tensor, many mid-sized ones) with ``dcp.save`` in one process, many times, alternating the
variants so that a disk whose speed drifts cannot favour one of them:

- cairn's writer (``LocalStore.writer``: staging dir, fsync, manifest, atomic publish)
  with ``--threads`` writer threads, with and without its xxh3-128 checksums;
- stock DCP's ``FileSystemWriter`` (what torchtitan saves through), for reference;

then loads the cairn step cold (page cache dropped) with cairn's reader, with and without
``verify``, and with stock DCP's ``FileSystemReader``; then warm (from the page cache: what
the reader itself costs) with cairn's reader, the same with every tensor through
``torch.load`` (its path before the raw reads), and stock DCP's. Next to them, the disk's own
ceilings, measured in the same run: an fsync'd sequential write (the faster of a plain one
and one that starts the disk's writeback as it goes, as cairn's writer does) and a cold
sequential read of a file of the same size.

    python benchmarks/storage_bench.py --folder /data/bench --gb 4 --out storage.json

Ratios printed (medians over ``--repeats``; each checksum ratio is taken between the two
saves of one repeat, which run back to back): persist efficiency = bytes / save time /
fsync'd write ceiling; load efficiency = bytes / cold load time / cold read ceiling;
checksum overhead = save time with checksums / without, load time with verify / without.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout run without `pip install -e .`

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter  # noqa: E402

from cairn.checkpoint import reader as cairn_reader  # noqa: E402
from cairn.checkpoint.fsio import writeback_bytes  # noqa: E402
from cairn.checkpoint.local import LocalStore  # noqa: E402
from disk_io import CHUNK, evict, files_under, read_file, try_drop_caches, write_file  # noqa: E402  (benchmarks/)


def make_state(nbytes: int) -> dict[str, torch.Tensor]:
    """fp32 tensors totalling ~``nbytes``: an eighth in one tensor, the rest in 32 MiB ones."""
    elements = nbytes // 4
    big = max(elements // 8, 1)
    state = {"tok_embeddings.weight": torch.empty(big)}
    left, i = elements - big, 0
    while left > 0:
        n = min(left, 8 << 20)
        state[f"layers.{i}.weight"] = torch.empty(n)
        left -= n
        i += 1
    generator = torch.Generator().manual_seed(0)
    for tensor in state.values():  # incompressible, reproducible
        tensor.uniform_(generator=generator)
    return state


def drop_cache(paths: list[Path], policy: str) -> str:
    if policy == "auto" and os.geteuid() == 0 and try_drop_caches():
        return "drop_caches"
    evict(paths)
    return "posix_fadvise(DONTNEED)"


def ceilings(folder: Path, nbytes: int, policy: str) -> dict[str, Any]:
    path = folder / "ceiling.bin"
    block = os.urandom(CHUNK)
    plain_s = write_file(path, nbytes, block)["fsync_s"]
    streamed_s = write_file(path, nbytes, block, writeback=True)["fsync_s"]
    method = drop_cache([path], policy)
    read_s = read_file(path)
    path.unlink()
    return {"bytes": nbytes, "write_fsync_gbps": nbytes / min(plain_s, streamed_s) / 1e9,
            "write_fsync_plain_gbps": nbytes / plain_s / 1e9, "write_fsync_streamed_gbps": nbytes / streamed_s / 1e9,
            "cold_read_gbps": nbytes / read_s / 1e9, "cache_drop": method}


def save_once(folder: Path, state: dict, variant: dict[str, Any]) -> float:
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    if variant["writer"] == "cairn":
        writer = LocalStore(folder).writer(1, {"kind": "bench"}, checksums=variant["checksums"],
                                                  thread_count=variant["threads"])
    else:
        folder.mkdir(parents=True)
        writer = FileSystemWriter(folder / "step-1", thread_count=variant["threads"])
    dcp.save(state, storage_writer=writer, no_dist=True)
    return time.perf_counter() - start


def load_once(step_dir: Path, target: dict, reader: str, policy: str, warm: bool = False) -> tuple[float, str]:
    """One load by ``reader``: cairn, cairn+verify, stock (DCP's FileSystemReader), or
    cairn/torch.load (cairn's reader with every tensor deserialized by torch.load, as before
    its raw path). Cold unless ``warm`` (then the page cache holds the files: the reader's own
    cost, without the disk's)."""
    method = "warm" if warm else drop_cache(files_under(step_dir), policy)
    raw_path = cairn_reader.RAW_PLACEMENT
    if reader == "cairn/torch.load":
        cairn_reader.RAW_PLACEMENT = False
    try:
        start = time.perf_counter()
        if reader == "stock":
            dcp.load(target, storage_reader=FileSystemReader(step_dir), no_dist=True)
        else:
            LocalStore(step_dir.parent).load(target, step_dir, verify=reader == "cairn+verify", no_dist=True)
        return time.perf_counter() - start, method
    finally:
        cairn_reader.RAW_PLACEMENT = raw_path


def name(variant: dict[str, Any]) -> str:
    if variant["writer"] == "stock":
        return f"stock DCP FileSystemWriter, {variant['threads']} thread(s)"
    return f"cairn, {variant['threads']} thread(s), checksums {'on' if variant['checksums'] else 'off'}"


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default="outputs/storage_bench", help="a folder on the disk to measure")
    parser.add_argument("--gb", type=float, default=4.0, help="size of the state dict, GB")
    parser.add_argument("--threads", default="1,2,4", help="cairn writer thread counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="saves per variant (and cold loads per reader)")
    parser.add_argument("--drop-caches", choices=("auto", "never"), default="auto")
    parser.add_argument("--out", default=None, help="JSON results")
    args = parser.parse_args(argv)

    folder = Path(args.folder).resolve()
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    state = make_state(int(args.gb * 1e9))
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    report: dict[str, Any] = {
        "host": {"hostname": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
                 "python": platform.python_version()},
        "config": {"argv": argv, "bytes": nbytes, "tensors": len(state), "folder": str(folder),
                   "writeback_bytes": writeback_bytes()},
        "ceilings": ceilings(folder, nbytes, args.drop_caches),
    }
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    variants = [{"writer": "cairn", "threads": t, "checksums": c} for t in threads for c in (True, False)]
    variants.append({"writer": "stock", "threads": 1, "checksums": False})
    times: dict[str, list[float]] = {name(v): [] for v in variants}
    pairs: dict[int, list[float]] = {t: [] for t in threads}
    for repeat in range(args.repeats):
        order = variants if repeat % 2 == 0 else variants[::-1]
        for variant in order:
            times[name(variant)].append(save_once(folder / "save", state, variant))
        for t in threads:
            on = times[name({"writer": "cairn", "threads": t, "checksums": True})][-1]
            off = times[name({"writer": "cairn", "threads": t, "checksums": False})][-1]
            pairs[t].append(on / off)
    write_ceiling = report["ceilings"]["write_fsync_gbps"]
    report["saves"] = {
        key: {"s": values, "median_s": statistics.median(values), "gbps": nbytes / statistics.median(values) / 1e9,
              "persist_efficiency": nbytes / statistics.median(values) / 1e9 / write_ceiling}
        for key, values in times.items()}
    report["save_checksum_overhead"] = {t: {"per_repeat": v, "median": statistics.median(v)} for t, v in pairs.items()}

    save_once(folder / "save", state, {"writer": "cairn", "threads": threads[0], "checksums": True})
    step_dir = folder / "save" / "step-1"
    target = {k: torch.empty_like(v) for k, v in state.items()}
    readers = ("cairn", "cairn+verify", "stock")
    loads: dict[str, list[float]] = {r: [] for r in readers}
    method = None
    for repeat in range(args.repeats):
        for reader in readers if repeat % 2 == 0 else readers[::-1]:
            elapsed, method = load_once(step_dir, target, reader, args.drop_caches)
            loads[reader].append(elapsed)
    assert all(torch.equal(target[k], state[k]) for k in state), "loaded state differs from the saved one"
    read_ceiling = report["ceilings"]["cold_read_gbps"]
    report["loads"] = {r: {"s": v, "median_s": statistics.median(v), "gbps": nbytes / statistics.median(v) / 1e9,
                           "load_efficiency": nbytes / statistics.median(v) / 1e9 / read_ceiling, "cache_drop": method}
                       for r, v in loads.items()}
    verify_pairs = [a / b for a, b in zip(loads["cairn+verify"], loads["cairn"])]
    report["load_checksum_overhead"] = {"per_repeat": verify_pairs, "median": statistics.median(verify_pairs)}
    # The readers' own cost: the same loads from the page cache (after one to fill it).
    warm_readers = ("cairn", "cairn/torch.load", "stock")
    warm: dict[str, list[float]] = {r: [] for r in warm_readers}
    load_once(step_dir, target, "cairn", args.drop_caches, warm=True)
    for repeat in range(args.repeats):
        for reader in warm_readers if repeat % 2 == 0 else warm_readers[::-1]:
            warm[reader].append(load_once(step_dir, target, reader, args.drop_caches, warm=True)[0])
    assert all(torch.equal(target[k], state[k]) for k in state), "loaded state differs from the saved one"
    report["warm_loads"] = {r: {"s": v, "median_s": statistics.median(v), "gbps": nbytes / statistics.median(v) / 1e9}
                            for r, v in warm.items()}
    shutil.rmtree(folder, ignore_errors=True)

    print(f"state {nbytes / 1e9:.2f} GB in {len(state)} tensors; disk: fsync'd write {write_ceiling:.2f} GB/s, "
          f"cold read {read_ceiling:.2f} GB/s ({report['ceilings']['cache_drop']}); fsync'd write plain "
          f"{report['ceilings']['write_fsync_plain_gbps']:.2f} GB/s, with writeback as written "
          f"{report['ceilings']['write_fsync_streamed_gbps']:.2f} GB/s")
    for key, row in report["saves"].items():
        print(f"  save  {key:<44} {row['median_s']:7.2f} s {row['gbps']:6.2f} GB/s  "
              f"persist eff {row['persist_efficiency']:.2f}")
    for t, row in report["save_checksum_overhead"].items():
        print(f"  save with / without checksums, {t} thread(s): {row['median']:.3f} "
              f"({', '.join(f'{x:.3f}' for x in row['per_repeat'])})")
    for key, row in report["loads"].items():
        print(f"  load  {key:<44} {row['median_s']:7.2f} s {row['gbps']:6.2f} GB/s  load eff {row['load_efficiency']:.2f}")
    print(f"  load with / without verify: {report['load_checksum_overhead']['median']:.3f}")
    for key, row in report["warm_loads"].items():
        print(f"  warm  {key:<44} {row['median_s']:7.2f} s {row['gbps']:6.2f} GB/s  (page cache)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
