"""Time and peak memory of the offline HF <-> DCP conversions on a real model size.

    python benchmarks/convert_bench.py --flavor 8B --workdir /tmp/cairn_convert_bench \
        --json benchmarks/convert_8B.json

Writes random weights of the flavor as a Hugging Face directory (shard by shard, never the
whole model in memory), then runs each conversion in a fresh process and reports its wall
time, throughput and peak RSS (``ru_maxrss``; the process's RSS after imports is given
too, so the conversion's own share is the difference). ``--verify`` then compares the
round-tripped HF directory with the source, tensor by tensor (bitwise).
Needs about 3x the model's size on disk under --workdir.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout run without `pip install -e .`


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def write_random_hf(flavor: str, out_dir: Path, dtype: str, max_shard_bytes: int) -> dict:
    """The flavor's tensors, random, as an HF directory; one tensor in memory at a time."""
    import torch

    from cairn.checkpoint.adapter import hf_parts
    from cairn.checkpoint.hf import HFExportWriter, natural_order, staged_output
    from cairn.models import get_model_spec

    spec = get_model_spec("llama3")
    args = spec.flavors[flavor]
    adapter = spec.state_dict_adapter(args)
    with torch.device("meta"):
        shapes = {fqn: tuple(t.shape) for fqn, t in spec.model_cls(args).state_dict().items()}
    entries = [(fqn, shapes[fqn]) for fqn in natural_order(shapes) if hf_parts(adapter, fqn)]
    start = time.perf_counter()
    with staged_output(out_dir) as staging:
        writer = HFExportWriter(staging, adapter, dtype, entries, max_shard_bytes)
        generator = torch.Generator().manual_seed(0)
        for fqn, shape in entries:
            writer.write(fqn, torch.empty(shape, dtype=getattr(torch, dtype)).normal_(0, 0.02, generator=generator))
        writer.finish()
    return {"seconds": time.perf_counter() - start, "bytes": writer.total_bytes, "files": len(writer.file_names),
            "tensors": len(entries), "params": sum(math.prod(s) for s in shapes.values())}


def _child(direction: str, source: str, target: str, flavor: str, dtype: str) -> None:
    """One conversion in this (fresh) process; prints its figures as JSON."""
    from cairn.checkpoint.convert import convert_dcp_to_hf, convert_hf_to_dcp

    baseline = _rss_bytes()
    start = time.perf_counter()
    if direction == "hf_to_dcp":
        stats = convert_hf_to_dcp(source, target, flavor=flavor, progress=False)
    else:
        stats = convert_dcp_to_hf(source, target, flavor=flavor, export_dtype=dtype, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "bytes": stats["bytes"], "tensors": stats["tensors"],
                      "baseline_rss_bytes": baseline, "peak_rss_bytes": peak}))


def run_child(direction: str, source: Path, target: Path, flavor: str, dtype: str) -> dict:
    command = [sys.executable, __file__, "--child", direction, str(source), str(target), "--flavor", flavor,
               "--dtype", dtype]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{direction} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def verify_round_trip(source: Path, result: Path) -> dict:
    import torch

    from cairn.checkpoint.hf import HFWeights

    before, after = HFWeights(source), HFWeights(result)
    if sorted(before.files) != sorted(after.files):
        return {"bitwise_equal": False, "reason": "different keys"}
    for key in before.files:
        if not torch.equal(before.read(key), after.read(key)):
            return {"bitwise_equal": False, "reason": key}
    return {"bitwise_equal": True, "tensors": len(before.files)}


def _disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flavor", default="8B")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--workdir", default="/tmp/cairn_convert_bench")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--max_shard_bytes", type=int, default=5_000_000_000)
    parser.add_argument("--verify", action="store_true", help="compare the round trip bitwise")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--child", nargs=3, metavar=("DIRECTION", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child, args.flavor, args.dtype)
        return

    import torch

    workdir = Path(args.workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    hf_dir, dcp_dir, back_dir = workdir / "hf", workdir / "dcp", workdir / "hf_back"
    print(f"writing random {args.flavor} ({args.dtype}) weights to {hf_dir} ...", flush=True)
    source = write_random_hf(args.flavor, hf_dir, args.dtype, args.max_shard_bytes)
    rows = {"hf_to_dcp": run_child("hf_to_dcp", hf_dir, dcp_dir, args.flavor, args.dtype)}
    rows["dcp_to_hf"] = run_child("dcp_to_hf", dcp_dir, back_dir, args.flavor, args.dtype)
    results = {
        "flavor": args.flavor, "dtype": args.dtype, "params": source["params"], "model_bytes": source["bytes"],
        "hf_files": source["files"], "dcp_disk_bytes": _disk_bytes(dcp_dir), "write_random_hf_s": source["seconds"],
        "conversions": rows, "host": {"platform": platform.platform(), "python": platform.python_version(),
                                      "torch": torch.__version__, "cpus": __import__("os").cpu_count()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    if args.verify:
        results["verify"] = verify_round_trip(hf_dir, back_dir)
    print(f"\n{args.flavor} {args.dtype}: {source['params'] / 1e9:.2f} B params, {source['bytes'] / 1e9:.2f} GB")
    print(f"{'conversion':<12}{'time s':>9}{'GB/s':>8}{'peak RSS GB':>13}{'RSS after imports GB':>22}")
    for name, row in rows.items():
        print(f"{name:<12}{row['seconds']:>9.1f}{row['bytes'] / row['seconds'] / 1e9:>8.2f}"
              f"{row['peak_rss_bytes'] / 1e9:>13.2f}{row['baseline_rss_bytes'] / 1e9:>22.2f}")
    if args.verify:
        print(f"round trip bitwise equal: {results['verify']['bitwise_equal']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    if not args.keep:
        shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
