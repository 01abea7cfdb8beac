"""Checkpoints in object storage: cairn's S3Store against the server's own ceilings and DCP's fsspec (s3fs).

One command, one server, one state (``--gb`` of float32 tensors of ``--tensor-mb`` each), in
the same run:

- the server's ceilings with raw boto3 calls: one object of ``--ceiling-mb`` up as a multipart
  upload and down with ranged GETs of ``CAIRN_S3_PART_MB`` parts, one connection at a time and
  ``--connections`` at once; at ``--connections``, in rounds with cairn's save and loads, each
  of which is set against its own round's ceiling (the ratios are the medians of the rounds':
  on a shared machine the load of other jobs drifts within a run);
- cairn: ``save`` of the state as a step (multipart, hashed as it goes up, committed by the
  marker), ``load`` of it back (ranged GETs, verified, and with ``verify=False``);
- DCP's own ``FsspecWriter`` / ``FsspecReader`` over s3fs (what torchtitan's s3:// support uses),
  writing one file per rank as cairn does (``single_file_per_rank``), its thread count as cairn's.

Without ``--endpoint`` it starts a test server on 127.0.0.1 in processes of its own:
``--server moto`` (default; ``tests/s3_server.py``, moto's server mode, one Python process)
or ``--server rgw`` (``tests/rgw_server.py``: Ceph's RADOS Gateway on a one-monitor, one-OSD
memstore cluster, as Debian packages it). Where a server caps every client, the 1- and
N-connection ceilings show it, and the ratios say so. What each measurement wrote is deleted
after it, so a memory-backed server holds one state at a time.

    python benchmarks/s3_bench.py --gb 1 --out s3_bench.json
    python benchmarks/s3_bench.py --server rgw --gb 0.336 --tensor-mb 64 --repeats 3 --out rgw.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

from cairn.checkpoint import load, save  # noqa: E402
from cairn.checkpoint.s3 import S3Store  # noqa: E402
from cairn.checkpoint.s3_client import client, part_bytes  # noqa: E402


def state_of(gigabytes: float, tensor_mb: int) -> dict[str, torch.Tensor]:
    count = max(1, int(gigabytes * 1e9 / (tensor_mb << 20)))
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.rand(tensor_mb << 18, generator=generator) for i in range(count)}


def nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def raw_put(bucket: str, key: str, data: bytes, connections: int) -> float:
    s3 = client()
    part = part_bytes()
    start = time.perf_counter()
    upload = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    pieces = [(i + 1, data[offset:offset + part]) for i, offset in enumerate(range(0, len(data), part))]

    def put(piece):
        number, body = piece
        return {"PartNumber": number, "ETag": s3.upload_part(Bucket=bucket, Key=key, UploadId=upload,
                                                             PartNumber=number, Body=body)["ETag"]}

    with concurrent.futures.ThreadPoolExecutor(max_workers=connections) as pool:
        parts = list(pool.map(put, pieces))
    s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})
    return time.perf_counter() - start


def raw_get(bucket: str, key: str, size: int, connections: int) -> float:
    s3 = client()
    part = part_bytes()
    start = time.perf_counter()

    def get(offset):
        end = min(size, offset + part) - 1
        return len(s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{end}")["Body"].read())

    with concurrent.futures.ThreadPoolExecutor(max_workers=connections) as pool:
        got = sum(pool.map(get, range(0, size, part)))
    assert got == size
    return time.perf_counter() - start


def start_rgw(lifetime: float, beast: str = ""):
    """tests/rgw_server.py in a process of its own: (process, endpoint) once the gateway answers."""
    import subprocess

    # What the benchmark deletes is collected after it (RGW's default), not during a measurement.
    process = subprocess.Popen([sys.executable, str(REPO / "tests" / "rgw_server.py"), "--lifetime", str(lifetime),
                                "--memstore-gb", "8", "--beast", beast, "--set", "rgw gc obj min wait = 7200"],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    url = process.stdout.readline().strip()
    if not url.startswith("http://"):
        process.kill()
        raise RuntimeError("Ceph RGW did not start (see tests/rgw_server.py)")
    return process, url


def delete_prefix(bucket: str, prefix: str) -> None:
    s3 = client()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if found:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": found, "Quiet": True})


def small_requests_ms(bucket: str, count: int = 15) -> dict[str, float]:
    """Median milliseconds of the small requests a load and a commit make before any data (a
    marker, a manifest, the lease): GET of 100 B and 10 kB, HEAD, PUT of 100 B, LIST."""
    s3 = client()
    s3.put_object(Bucket=bucket, Key="small/100", Body=os.urandom(100))
    s3.put_object(Bucket=bucket, Key="small/10k", Body=os.urandom(10_000))
    calls = {"get_100B": lambda: s3.get_object(Bucket=bucket, Key="small/100")["Body"].read(),
             "get_10kB": lambda: s3.get_object(Bucket=bucket, Key="small/10k")["Body"].read(),
             "head": lambda: s3.head_object(Bucket=bucket, Key="small/100"),
             "put_100B": lambda: s3.put_object(Bucket=bucket, Key="small/put", Body=b"x" * 100),
             "list": lambda: s3.list_objects_v2(Bucket=bucket, Prefix="small/", Delimiter="/")}
    out = {name: round(1000 * statistics.median(timed(call, count)), 1) for name, call in calls.items()}
    delete_prefix(bucket, "small/")
    return out


def timed(fn, repeats: int, prepare=None) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``; ``prepare()`` runs (untimed) before each."""
    out = []
    for _ in range(repeats):
        if prepare is not None:
            prepare()
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of the state saved and loaded")
    parser.add_argument("--tensor-mb", type=int, default=64, help="size of each tensor")
    parser.add_argument("--ceiling-mb", type=int, default=0,
                        help="size of the object the raw ceilings move (0: the state's size, so that the server "
                             "serves the ranges of an object as large as cairn's one data file)")
    parser.add_argument("--connections", type=int, default=int(os.environ.get("CAIRN_S3_CONNECTIONS", 16)))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--endpoint", default=None, help="an S3-compatible endpoint (default: start --server)")
    parser.add_argument("--server", choices=("moto", "rgw"), default="moto",
                        help="the test server to start when no --endpoint is given")
    parser.add_argument("--rgw-beast", default="", help="options of RGW's beast frontend, e.g. tcp_nodelay=1")
    parser.add_argument("--skip-fsspec", action="store_true")
    parser.add_argument("--out", default="s3_bench.json")
    args = parser.parse_args(argv)
    os.environ["CAIRN_S3_CONNECTIONS"] = str(args.connections)
    server = None
    if args.endpoint is None:
        import s3_server

        server, args.endpoint = (s3_server.start(lifetime=7200) if args.server == "moto"
                                 else start_rgw(lifetime=7200, beast=args.rgw_beast))
        os.environ.update(s3_server.environment(args.endpoint))
    os.environ["AWS_ENDPOINT_URL"] = args.endpoint
    s3 = client()
    bucket = f"cairn-bench-{uuid.uuid4().hex[:10]}"
    s3.create_bucket(Bucket=bucket)
    report: dict = {"host": {"python": platform.python_version(), "torch": torch.__version__,
                             "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                             "load_average": os.getloadavg()},
                    "server": args.server if server is not None else args.endpoint,
                    "config": {**vars(args), "part_bytes": part_bytes(), "argv": argv}}
    try:
        report["small_requests_ms"] = small_requests_ms(bucket)
        state = state_of(args.gb, args.tensor_mb)
        size = nbytes(state)
        payload = os.urandom(args.ceiling_mb << 20 if args.ceiling_mb else size)
        ceilings = {}
        one = [raw_put(bucket, f"ceiling/1-{i}", payload, 1) for i in range(args.repeats)]
        ceilings["1"] = {"put_s": one, "get_s": [raw_get(bucket, "ceiling/1-0", len(payload), 1)
                                                 for _ in range(args.repeats)]}
        delete_prefix(bucket, "ceiling/1-")
        report["state_bytes"] = size
        store = S3Store(bucket, "cairn")
        target = {key: torch.empty_like(value) for key, value in state.items()}
        # At N connections, in rounds: the raw PUT, then cairn's save, the raw GETs, then cairn's
        # loads; each figure is set against its round's ceiling, taken moments before (on a shared
        # machine the load of other jobs drifts within a run).
        rounds = {"put_s": [], "save_s": [], "get_s": [], "load_verify_s": [], "load_s": []}
        n = args.connections
        for i in range(args.repeats):
            rounds["put_s"].append(raw_put(bucket, f"ceiling/{n}-{i}", payload, n))
            for old in store.committed_steps():  # the server holds one state of cairn's at a time
                store.delete(old)
            rounds["save_s"] += timed(lambda: save(state, store, i + 1), 1)
            rounds["get_s"].append(raw_get(bucket, f"ceiling/{n}-{i}", len(payload), n))
            rounds["load_verify_s"] += timed(lambda: load(target, store), 1)
            assert all(torch.equal(target[k], state[k]) for k in state)
            rounds["load_s"] += timed(lambda: load(target, store, verify=False), 1)
            delete_prefix(bucket, f"ceiling/{n}-{i}")
        ceilings[str(n)] = {"put_s": rounds["put_s"], "get_s": rounds["get_s"]}
        for figures in ceilings.values():
            figures["put_gbps"] = len(payload) / min(figures["put_s"]) / 1e9
            figures["get_gbps"] = len(payload) / min(figures["get_s"]) / 1e9
        report["ceilings"] = ceilings
        del payload
        saves, loads, loads_plain = rounds["save_s"], rounds["load_verify_s"], rounds["load_s"]
        report["cairn"] = {"save_s": saves, "load_verify_s": loads, "load_s": loads_plain,
                           "save_gbps": size / statistics.median(saves) / 1e9,
                           "load_verify_gbps": size / statistics.median(loads) / 1e9,
                           "load_gbps": size / statistics.median(loads_plain) / 1e9}
        report["rounds"] = {"save_over_put": [p / c for p, c in zip(rounds["put_s"], saves)],
                            "load_over_get": [g / c for g, c in zip(rounds["get_s"], loads)],
                            "plain_load_over_get": [g / c for g, c in zip(rounds["get_s"], loads_plain)]}
        if not args.skip_fsspec:
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

            count = iter(range(1000))
            paths: list[str] = []

            def fsspec_save() -> None:
                paths.append(f"s3://{bucket}/fsspec/step-{next(count)}")
                dcp.save(state, storage_writer=FsspecWriter(paths[-1], single_file_per_rank=True, sync_files=False,
                                                            thread_count=1), no_dist=True)

            fsspec_saves = timed(fsspec_save, args.repeats, prepare=lambda: delete_prefix(bucket, "fsspec/"))
            fsspec_loads = timed(lambda: dcp.load(target, storage_reader=FsspecReader(paths[-1]), no_dist=True),
                                 args.repeats)
            report["dcp_fsspec"] = {"save_s": fsspec_saves, "load_s": fsspec_loads,
                                    "save_gbps": size / statistics.median(fsspec_saves) / 1e9,
                                    "load_gbps": size / statistics.median(fsspec_loads) / 1e9}
        best = ceilings[str(args.connections)]
        paired = report["rounds"]
        ratios = {"cairn_save_over_put_ceiling": statistics.median(paired["save_over_put"]),
                  "cairn_load_over_get_ceiling": statistics.median(paired["load_over_get"]),
                  "cairn_plain_load_over_get_ceiling": statistics.median(paired["plain_load_over_get"]),
                  "put_ceiling_n_over_1": best["put_gbps"] / ceilings["1"]["put_gbps"],
                  "get_ceiling_n_over_1": best["get_gbps"] / ceilings["1"]["get_gbps"]}
        if "dcp_fsspec" in report:
            ratios["cairn_over_fsspec_save"] = report["cairn"]["save_gbps"] / report["dcp_fsspec"]["save_gbps"]
            ratios["cairn_over_fsspec_load"] = report["cairn"]["load_verify_gbps"] / report["dcp_fsspec"]["load_gbps"]
        report["ratios"] = ratios
    finally:
        report["host"]["load_average_end"] = os.getloadavg()  # other jobs on a shared machine, at the end
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        if server is not None:
            server.terminate()  # the RGW launcher stops its daemons and removes its cluster
            server.wait()
    c = report["ceilings"]
    print(f"state {report['state_bytes'] / 1e9:.2f} GB, parts of {part_bytes() >> 20} MiB, endpoint {args.endpoint}")
    print("  small requests, median ms: " + ", ".join(f"{k} {v}" for k, v in report["small_requests_ms"].items()))
    for n, figures in c.items():
        print(f"  raw boto3, {n:>2} connection(s): PUT {figures['put_gbps']:.3f} GB/s, GET {figures['get_gbps']:.3f} GB/s")
    print(f"  cairn: save {report['cairn']['save_gbps']:.3f} GB/s, load (verified) "
          f"{report['cairn']['load_verify_gbps']:.3f} GB/s, load {report['cairn']['load_gbps']:.3f} GB/s")
    if "dcp_fsspec" in report:
        print(f"  DCP fsspec (s3fs): save {report['dcp_fsspec']['save_gbps']:.3f} GB/s, load "
              f"{report['dcp_fsspec']['load_gbps']:.3f} GB/s")
    for name, value in report["ratios"].items():
        print(f"  {name:<32}{value:8.2f}")
    print(f"results: {Path(args.out).resolve()}")


if __name__ == "__main__":
    main(sys.argv[1:])
