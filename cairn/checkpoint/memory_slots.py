"""The memory tier's files on one node: its directory, its slots and what is read from them.

Per node, under ``memory_dir``::

    rank-<r>/slot-<0|1>/data.bin        rank r's tensors, each at a 4 KiB-aligned offset
    rank-<r>/slot-<i>/state.pt          the rest of its state (plain values; weights-only loadable)
    rank-<r>/slot-<i>/COMMITTED         JSON: step, layout, leaves, xxh3-128 of each 64 MiB chunk
    replica-of-<r>/slot-<i>/...         the same, received from rank r on another node
    progress-<r>                        the last step rank r trained (for "steps lost")

``COMMITTED`` is written last (a rename): a slot without it holds no snapshot. What goes into
a slot and how a restore uses it is ``memory.py``'s; this module is the files.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import json
import mmap
import os
from pathlib import Path

import xxhash

from cairn.checkpoint.errors import CheckpointError
from cairn.checkpoint.fsio import read_regular, write_file_durably

SLOTS = 2
CHUNK = 64 << 20  # bytes per checksum
COMMITTED, DATA, STATE = "COMMITTED", "data.bin", "state.pt"


def default_dir(folder_url: str) -> Path:
    """Where a run keeps its snapshots unless told: /dev/shm (tmpfs: outlives the process,
    not the host) under a name derived from the checkpoint folder."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
    return base / f"cairn-{hashlib.sha1(folder_url.encode()).hexdigest()[:12]}"


def chunk_hashes(view: memoryview, pool: concurrent.futures.Executor) -> list[str]:
    """xxh3-128 of each ``CHUNK`` bytes of ``view``, hashed in parallel (xxhash releases the GIL)."""
    return list(pool.map(lambda start: xxhash.xxh3_128(view[start:start + CHUNK]).hexdigest(),
                         range(0, len(view), CHUNK)))


class Mapped:
    """A map of a file's first ``size`` bytes to read (an empty view for 0)."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size
        self._file = self._map = None

    def __enter__(self) -> memoryview:
        if not self.size:
            return memoryview(b"")
        self._file = open(self.path, "rb")
        # copy-on-write: writable for torch.frombuffer, never written
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        self._view = memoryview(self._map)[:self.size]
        return self._view

    def __exit__(self, *exc) -> None:
        if self._map is not None:
            self._view.release()
            self._map.close()
            self._file.close()


class Slot:
    """One snapshot's place on this node: ``data.bin``, ``state.pt`` and ``COMMITTED``."""

    def __init__(self, folder: Path):
        self.folder = folder

    @property
    def data(self) -> Path:
        return self.folder / DATA

    def read_state(self) -> bytes:
        return (self.folder / STATE).read_bytes()

    def write_state(self, state: bytes) -> None:
        write_file_durably(self.folder / STATE, state)

    def record(self) -> dict | None:
        try:
            record = json.loads(read_regular(self.folder / COMMITTED, limit=64 << 20))
        except (OSError, ValueError, CheckpointError):
            return None
        return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None

    def invalidate(self) -> None:
        (self.folder / COMMITTED).unlink(missing_ok=True)

    def commit(self, record: dict) -> None:
        write_file_durably(self.folder / COMMITTED, json.dumps(record).encode())

    def problems(self, record: dict, pool: concurrent.futures.Executor) -> list[str]:
        """What does not match the record: sizes, the checksum of state.pt and of each chunk of data.bin."""
        data = self.folder / DATA
        try:
            size = data.stat().st_size
            state = (self.folder / STATE).read_bytes()
            want, chunks, state_hash = int(record["data_bytes"]), list(record["chunks"]), record["state_xxh3"]
        except (OSError, KeyError, TypeError, ValueError) as e:
            return [f"{self.folder}: {e}"]
        if size < want:
            return [f"{data}: {size} bytes, the snapshot recorded {want}"]
        problems = []
        if xxhash.xxh3_128(state).hexdigest() != state_hash:
            problems.append(f"{self.folder / STATE}: checksum mismatch")
        with Mapped(data, want) as view:
            hashes = chunk_hashes(view, pool)
        bad = [i for i, (a, b) in enumerate(zip(hashes, chunks)) if a != b]
        if bad or len(hashes) != len(chunks):
            problems.append(f"{data}: checksum mismatch in {CHUNK >> 20} MiB chunk(s) {bad or 'count'}")
        return problems


def own_slots(directory: Path, rank: int) -> list[Slot]:
    """The slots of ``rank``'s own snapshots."""
    return [Slot(directory / f"rank-{rank}" / f"slot-{i}") for i in range(SLOTS)]


def replica_slots(directory: Path, owner: int) -> list[Slot]:
    """The slots of the replicas of ``owner``'s snapshots this node keeps."""
    return [Slot(directory / f"replica-of-{owner}" / f"slot-{i}") for i in range(SLOTS)]


def make_slots(slots: list[Slot]) -> None:
    for slot in slots:
        slot.folder.mkdir(parents=True, exist_ok=True)


def progress_path(directory: Path, rank: int) -> Path:
    return directory / f"progress-{rank}"


def read_progress(path: Path) -> int | None:
    """The last step a rank trained, or None when it has not said."""
    try:
        return int.from_bytes(path.read_bytes()[:8], "little")
    except OSError:
        return None


def write_progress(path: Path, step: int) -> None:
    """The last step this rank trained (8 bytes, rewritten): what a restart counts steps lost from."""
    try:
        path.write_bytes(step.to_bytes(8, "little"))
    except OSError:
        pass


def list_snapshots(directory: str | os.PathLike, checksums: bool = False) -> list[dict]:
    """Every slot of a node's memory folder, newest step first: whose, which step, committed or
    not, bytes, layout, time (and with ``checksums`` whether every chunk matches)."""
    base = Path(directory)
    rows = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for holder in sorted([*base.glob("rank-*"), *base.glob("replica-of-*")]):
            for folder in sorted(holder.glob("slot-*")):
                slot, data = Slot(folder), folder / DATA
                record = slot.record()
                row = {"holder": holder.name, "slot": folder.name, "path": str(folder),
                       "step": record["step"] if record else None, "committed": record is not None,
                       "bytes": record.get("data_bytes") if record else (data.stat().st_size if data.exists() else 0),
                       "layout": record.get("layout") if record else None,
                       "created_unix": record.get("created_unix") if record else None}
                if checksums and record:
                    row["problems"] = slot.problems(record, pool)
                rows.append(row)
    progress = {}
    for path in base.glob("progress-*"):
        with contextlib.suppress(ValueError):
            progress[int(path.name.removeprefix("progress-"))] = read_progress(path)
    for row in rows:
        owner = int(row["holder"].rpartition("-")[2]) if row["holder"].rpartition("-")[2].isdigit() else None
        row["rank"] = owner
        row["trained_to"] = progress.get(owner) if row["holder"].startswith("rank-") else None
    return sorted(rows, key=lambda r: (r["step"] is None, -(r["step"] or 0), r["holder"]))
