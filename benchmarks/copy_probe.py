"""How fast ``preadv`` copies a file out of the page cache, by the size of the buffer it lands in.

The reader's read-ahead and hashing threads each read 8 MiB at a time into a buffer of their
own (cairn/checkpoint/reader.py). This probe shows why the buffers stay that small: it
reads one cached file, 8 MiB per call, cycling through a buffer of each ``--buffers`` size,
``--repeats`` times each in turn. On a VM whose CPU caches and TLB cannot cover the larger
buffers, the copies into them run several times slower.

    python benchmarks/copy_probe.py --file /tmp/probe.bin --gb 1 --buffers 8,16,32,64
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

CALL = 8 << 20  # bytes per preadv call, as the reader's


def copy_rate(fd: int, size: int, buffer_bytes: int) -> float:
    """GB/s of reading ``size`` bytes of ``fd`` into a buffer of ``buffer_bytes``, CALL at a time."""
    buffer = memoryview(bytearray(buffer_bytes))
    start, offset, at = time.perf_counter(), 0, 0
    while offset < size:
        if at == buffer_bytes:
            at = 0
        n = os.preadv(fd, [buffer[at:at + min(CALL, buffer_bytes - at)]], offset)
        if n == 0:
            break
        offset, at = offset + n, at + n
    return offset / (time.perf_counter() - start) / 1e9


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", default="outputs/copy_probe.bin", help="file to read (made if missing)")
    parser.add_argument("--gb", type=float, default=1.0, help="size of the file made, GB")
    parser.add_argument("--buffers", default="8,16,32,64", help="buffer sizes, MiB, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over every buffer size")
    parser.add_argument("--out", default=None, help="JSON results")
    args = parser.parse_args(argv)
    try:
        sizes = [int(x) << 20 for x in args.buffers.split(",")]
    except ValueError:
        parser.error(f"--buffers: expected comma-separated MiB, got {args.buffers!r}")
    if any(size < CALL for size in sizes) or args.repeats < 1 or args.gb <= 0:
        parser.error(f"--buffers must each be >= {CALL >> 20} MiB, --repeats >= 1 and --gb > 0")
    path = Path(args.file)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        block = os.urandom(CALL)
        with open(path, "wb") as f:
            for _ in range(max(1, int(args.gb * 1e9) // CALL)):
                f.write(block)
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        copy_rate(fd, size, CALL)  # into the page cache first: every round then reads from memory
        rates: dict[str, list[float]] = {str(s >> 20): [] for s in sizes}
        for _ in range(args.repeats):
            for s in sizes:
                rates[str(s >> 20)].append(copy_rate(fd, size, s))
    finally:
        os.close(fd)
    for mib, values in rates.items():
        print(f"buffer {mib:>4} MiB: " + ", ".join(f"{v:.2f}" for v in values) + " GB/s")
    report = {"file": str(path), "bytes": size, "call_bytes": CALL, "gbps_by_buffer_mib": rates}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
