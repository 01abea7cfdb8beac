"""The ceilings behind a fast recovery on a GPU host, each measured on its own.

What a restart and a memory snapshot are made of, with nothing of cairn in the way:

- ``register``: ``cudaHostRegister`` of a ``/dev/shm`` file's mapping of ``--gb`` GB, whole and in
  pieces, and what it does to a training-like loop on the main thread meanwhile (GEMMs, a
  ``.item()`` per step): the step times before, during and after;
- ``restore``: the file's bytes to device memory: through the registered mapping, through
  reused pinned pieces filled by N threads, and plain pageable copies; xxh3-128 of the file on
  N threads; both at once;
- ``snapshot``: device to device (the snapshot), then device to the registered mapping in
  pieces while the loop runs (what the loop's steps pay);
- ``startup``: ``import torch``, CUDA's first context, NCCL's first group (one process).

    python benchmarks/recovery_probe.py --gb 16 --out probe.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import ctypes
import json
import mmap
import os
import statistics
import subprocess
import sys
import threading
import time


def sh(cmd: str) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return round(time.perf_counter() - start, 3)


def startup() -> dict:
    py = sys.executable
    out = {"import_torch_s": [sh(f"{py} -c 'import torch'") for _ in range(3)],
           "import_torch_cuda_init_s": [sh(f"{py} -c 'import torch; torch.zeros(1, device=\"cuda\")'")
                                        for _ in range(2)],
           "torchrun_help_s": sh(f"{py} -m torch.distributed.run --help"),
           # with a writable bytecode cache (the image's site-packages may hold no .pyc files)
           "import_torch_pycache_prefix_s": [sh(f"PYTHONPYCACHEPREFIX=/tmp/cairn-pyc {py} -c 'import torch'")
                                             for _ in range(3)]}
    import glob
    import importlib.util
    spec = importlib.util.find_spec("torch")
    root = os.path.dirname(spec.origin)
    out["torch_dir"] = root
    out["torch_dir_writable"] = os.access(root, os.W_OK)
    out["torch_pyc_files"] = len(glob.glob(os.path.join(root, "**", "__pycache__", "*.pyc"), recursive=True))
    code = ("import os, time, torch, torch.distributed as dist; t=time.perf_counter(); "
            "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT='29555', RANK='0', WORLD_SIZE='1'); "
            "torch.cuda.set_device(0); dist.init_process_group('nccl', device_id=torch.device('cuda:0')); "
            "x=torch.ones(1, device='cuda'); dist.all_reduce(x); torch.cuda.synchronize(); "
            "print(time.perf_counter()-t); dist.destroy_process_group()")
    try:
        out["nccl_init_s"] = float(subprocess.run([py, "-c", code], capture_output=True, text=True,
                                                  timeout=120).stdout.strip() or "nan")
    except (subprocess.SubprocessError, ValueError) as e:
        out["nccl_init_s"] = str(e)
    return out


def cudart():
    import torch  # noqa: F401  (loads libcudart)

    with open("/proc/self/maps") as maps:
        paths = sorted({line.split()[-1] for line in maps if "libcudart.so" in line})
    lib = ctypes.CDLL(paths[0])
    lib.cudaHostRegister.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    lib.cudaHostUnregister.argtypes = [ctypes.c_void_p]
    return lib


class Loop:
    """A stand-in training loop on the main thread: GEMMs worth about ``step_ms``, then a sync."""

    def __init__(self, torch, step_ms: float = 100.0):
        self.torch = torch
        self.sync = "item"
        self.scalar = torch.empty(1, dtype=torch.bfloat16, pin_memory=True)
        self.a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        self.b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        start = time.perf_counter()
        for _ in range(20):
            self.a @ self.b
        torch.cuda.synchronize()
        per = (time.perf_counter() - start) / 20
        self.n = max(1, int(step_ms / 1e3 / per))

    def step(self) -> float:
        start = time.perf_counter()
        for _ in range(self.n):
            c = self.a @ self.b
        if self.sync == "item":
            c[0, 0].item()
        elif self.sync == "stream":
            self.torch.cuda.current_stream().synchronize()
        else:  # into pinned memory
            self.scalar.copy_(c[0, :1], non_blocking=True)
            self.torch.cuda.current_stream().synchronize()
        return time.perf_counter() - start

    def run_while(self, work) -> dict:
        base = [self.step() for _ in range(10)]
        done = threading.Event()
        result = {}

        def target():
            t = time.perf_counter()
            result["value"] = work()
            result["seconds"] = round(time.perf_counter() - t, 4)
            done.set()

        thread = threading.Thread(target=target)
        thread.start()
        during = []
        while not done.is_set():
            during.append(self.step())
        thread.join()
        median = statistics.median(base)
        return {"work_s": result["seconds"], "step_median_s": round(median, 4),
                "steps_during": len(during), "max_step_during_s": round(max(during, default=0), 4),
                "extra_during_s": round(sum(during) - len(during) * median, 4), "value": result.get("value")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=16)
    parser.add_argument("--out", required=True)
    parser.add_argument("--dir", default="/dev/shm")
    args = parser.parse_args()
    report: dict = {"cpus": os.cpu_count()}
    report["startup"] = startup()
    print(json.dumps(report["startup"]), flush=True)

    import torch
    import xxhash

    lib = cudart()
    nbytes = int(args.gb * 1e9) // (64 << 20) * (64 << 20)
    path = os.path.join(args.dir, "cairn-probe.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    os.ftruncate(fd, nbytes)
    mm = mmap.mmap(fd, nbytes)
    base = torch.frombuffer(mm, dtype=torch.uint8)
    start = time.perf_counter()
    base.zero_()  # every page touched (Python < 3.14 has no MADV_POPULATE_WRITE)
    report["populate_s"] = round(time.perf_counter() - start, 3)
    ptr = base.data_ptr()
    loop = Loop(torch)
    device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    device.random_(0, 255)
    torch.cuda.synchronize()

    # --- register: whole, then in pieces, with the loop running ---
    def register_whole():
        rc = lib.cudaHostRegister(ptr, nbytes, 1)
        return rc

    report["register_whole"] = loop.run_while(register_whole)
    lib.cudaHostUnregister(ptr)
    piece = 1 << 30

    def register_pieces():
        for off in range(0, nbytes, piece):
            lib.cudaHostRegister(ptr + off, min(piece, nbytes - off), 1)
        return nbytes // piece

    report["register_pieces_1GiB"] = loop.run_while(register_pieces)
    for off in range(0, nbytes, piece):
        lib.cudaHostUnregister(ptr + off)

    def register_pieces_paced():
        for off in range(0, nbytes, piece):
            lib.cudaHostRegister(ptr + off, min(piece, nbytes - off), 1)
            time.sleep(0.03)
        return nbytes // piece

    report["register_pieces_1GiB_paced"] = loop.run_while(register_pieces_paced)
    print(json.dumps({k: report[k] for k in ("register_whole", "register_pieces_1GiB",
                                             "register_pieces_1GiB_paced")}), flush=True)

    # --- snapshot: D2D, then D2H into the registered pieces while the loop runs ---
    snap = torch.empty_like(device)
    torch.cuda.synchronize()
    start = time.perf_counter()
    snap.copy_(device)
    torch.cuda.synchronize()
    report["d2d_s"] = round(time.perf_counter() - start, 4)
    stream = torch.cuda.Stream()

    def drain(step=64 << 20, depth=2):
        events = []
        with torch.cuda.stream(stream):
            for off in range(0, nbytes, step):
                base[off:off + step].copy_(snap[off:off + step], non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
                events.append(event)
                if len(events) > depth:
                    events.pop(0).synchronize()
        for event in events:
            event.synchronize()
        return nbytes / 1e9

    report["d2h_registered_during_loop"] = loop.run_while(drain)
    for sync in ("stream", "pinned"):
        loop.sync = sync
        report[f"d2h_registered_during_loop_sync_{sync}"] = loop.run_while(drain)
    loop.sync = "item"
    report["d2h_registered_8MiB_depth0"] = loop.run_while(lambda: drain(8 << 20, 0))
    report["d2h_registered_8MiB_depth0_pinned_sync"] = None
    loop.sync = "pinned"
    report["d2h_registered_8MiB_depth0_pinned_sync"] = loop.run_while(lambda: drain(8 << 20, 0))
    loop.sync = "item"

    def drain_hash(threads):
        def work():
            step = 64 << 20
            view = memoryview(mm)
            with concurrent.futures.ThreadPoolExecutor(threads) as pool:
                futures, events = [], []
                with torch.cuda.stream(stream):
                    for off in range(0, nbytes, step):
                        base[off:off + step].copy_(snap[off:off + step], non_blocking=True)
                        event = torch.cuda.Event()
                        event.record(stream)
                        events.append((event, off))
                        if len(events) > 2:
                            e, o = events.pop(0)
                            e.synchronize()
                            futures.append(pool.submit(lambda o=o: xxhash.xxh3_128(view[o:o + step]).hexdigest()))
                for e, o in events:
                    e.synchronize()
                    futures.append(pool.submit(lambda o=o: xxhash.xxh3_128(view[o:o + step]).hexdigest()))
                [f.result() for f in futures]
            view.release()
            return threads
        return work

    report["d2h_and_hash_8_during_loop"] = loop.run_while(drain_hash(8))
    print(json.dumps({k: v for k, v in report.items() if k.startswith(("d2d", "d2h"))}), flush=True)

    # --- restore: registered H2D, hashing, pinned pieces by threads ---
    target = snap
    torch.cuda.synchronize()
    start = time.perf_counter()
    for off in range(0, nbytes, piece):  # a copy may not span two registrations
        target[off:off + piece].copy_(base[off:off + piece], non_blocking=True)
    torch.cuda.synchronize()
    report["h2d_registered_s"] = round(time.perf_counter() - start, 4)
    for off in range(0, nbytes, piece):
        lib.cudaHostUnregister(ptr + off)
    view = memoryview(mm)
    for threads in (1, 8, 15):
        start = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda o: xxhash.xxh3_128(view[o:o + (64 << 20)]).hexdigest(),
                          range(0, nbytes, 64 << 20)))
        report[f"xxh3_{threads}_threads_s"] = round(time.perf_counter() - start, 4)

    def pinned_pieces(threads: int, piece_bytes: int = 64 << 20, hash_threads: int = 0) -> float:
        """N threads each fill a reused pinned piece from the mapping and queue its H2D copy."""
        bounce = [torch.empty(piece_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(threads * 2)]
        streams = [torch.cuda.Stream() for _ in range(threads)]
        offsets = list(range(0, nbytes, piece_bytes))
        hpool = concurrent.futures.ThreadPoolExecutor(hash_threads) if hash_threads else None
        hashes = []

        def worker(i: int) -> None:
            mine = offsets[i::threads]
            pair, events = bounce[2 * i:2 * i + 2], [None, None]
            with torch.cuda.stream(streams[i]):
                for k, off in enumerate(mine):
                    b = pair[k % 2]
                    if events[k % 2] is not None:
                        events[k % 2].synchronize()
                    n = min(piece_bytes, nbytes - off)
                    b[:n].copy_(base[off:off + n])
                    target[off:off + n].copy_(b[:n], non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(streams[i])
                    events[k % 2] = event
            for event in events:
                if event is not None:
                    event.synchronize()

        start = time.perf_counter()
        if hpool:
            hashes = [hpool.submit(lambda o=o: xxhash.xxh3_128(view[o:o + piece_bytes]).hexdigest())
                      for o in offsets]
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(worker, range(threads)))
        [h.result() for h in hashes]
        seconds = time.perf_counter() - start
        if hpool:
            hpool.shutdown()
        return round(seconds, 4)

    for threads in (4, 8):
        report[f"h2d_pinned_pieces_{threads}_threads_s"] = pinned_pieces(threads)
    report["h2d_pinned_pieces_8_threads_with_hash_8_s"] = pinned_pieces(8, hash_threads=8)
    start = time.perf_counter()
    target[: 4 << 30].copy_(base[: 4 << 30])
    torch.cuda.synchronize()
    report["h2d_pageable_4GiB_s"] = round(time.perf_counter() - start, 4)
    view.release()
    print(json.dumps({k: v for k, v in report.items() if k.startswith(("h2d", "xxh3"))}), flush=True)
    del base
    mm.close()
    os.close(fd)
    os.unlink(path)
    report["gb"] = nbytes / 1e9
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
