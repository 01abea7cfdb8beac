"""The memory tier's files on one node: its directory, its slots and what is read from them.

Per node, under ``memory_dir``::

    run.json                            whose snapshots these are (the run, below)
    rank-<r>/slot-<0|1>/data.bin        rank r's tensors, each at a 4 KiB-aligned offset
    rank-<r>/slot-<i>/state.pt          the rest of its state (plain values; weights-only loadable)
    rank-<r>/slot-<i>/COMMITTED         JSON: step, run, layout, leaves, sizes, xxh3-128 of state.pt
                                        and of each 64 MiB chunk of data.bin
    replica-of-<r>/slot-<i>/...         the same, received from rank r on another node
    progress-<r>                        the last step rank r trained (for "steps lost")

``COMMITTED`` is written last (a rename): a slot without it holds no snapshot. What goes into
a slot and how a restore uses it is ``memory.py``'s; this module is the files, and it trusts
none of them: the directory lies where other users can write (``/dev/shm``).

- The directory is this user's alone: created mode 0700, and an existing one is used only when
  it is a real directory (not a link) owned by this user with mode 0700, every directory above
  it owned by root or this user and writable by no other (unless sticky, as /dev/shm and /tmp
  are), every link on the way owned by root or this user (``open_private_dir``).
- A file is created by an exclusive create of a fresh name, then renamed; ``data.bin`` is
  written in place, opened without following a link and only as a regular file of this user's
  with one name. Anything else found where a slot's file belongs is removed, logged, never
  followed (``make_slots``).
- Every read is bounded and of a regular file (never a FIFO or a device), its size checked
  against the record first; a record is checked whole (types, sizes, offsets, counts) before
  anything is allocated from it. A slot that fails is unusable, with why
  (``UnusableSnapshotError``).

Whose snapshot (``run`` in run.json and in every record): the checkpoint folder's canonical
location, the model, a fingerprint of the run config a resume depends on, and a run id. The
run id is drawn when a run starts on a checkpoint folder that does not exist yet (a new run)
and kept in run.json; a restart (the folder exists) with the same folder, model and config
adopts it. So a snapshot is restored only by a restart of the run that took it: another
folder, model or config, or a new run on a fresh (or wiped) folder, refuses it.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import json
import logging
import math
import mmap
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

import xxhash

from cairn.checkpoint.errors import CheckpointError
from cairn.checkpoint.fsio import file_kind, open_own_file, open_regular, read_regular, write_file_durably
from cairn.checkpoint.layout import dtype_named

logger = logging.getLogger("cairn")

SLOTS = 2
CHUNK = 64 << 20  # bytes per checksum
COMMITTED, DATA, STATE, RUN = "COMMITTED", "data.bin", "state.pt", "run.json"
MAX_RECORD_BYTES = 64 << 20  # a COMMITTED: ~200 bytes a tensor, 34 per 64 MiB chunk
MAX_STATE_BYTES = 1 << 30  # a state.pt: the plain values of a rank's state (kilobytes in practice)
MAX_RUN_BYTES = 1 << 20
MAX_DIMS = 64
_HEX128 = re.compile(r"[0-9a-f]{32}")


class UnusableSnapshotError(CheckpointError):
    """A slot whose files cannot be a snapshot of this run; the message names the file and why."""


class MemoryDirError(CheckpointError):
    """A memory directory that is not this user's alone; the message names it and why."""


# --- whose snapshots ---------------------------------------------------------------------------

def canonical_location(folder_url: str) -> str:
    """The checkpoint folder as one string whoever names it: a URI as is, a path absolute with
    its links resolved (``outputs/exp`` from two working directories are two folders)."""
    return folder_url if "://" in folder_url else os.path.realpath(os.path.abspath(folder_url))


def fingerprint(value: Any) -> str:
    """A short stable digest of a JSON-able value (keys sorted; anything else by its str)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def run_identity(folder_url: str, model: dict, resume_config: Any) -> dict:
    """What a snapshot must share with a run to be restored by it, but the run id (``run_id``)."""
    return {"folder": canonical_location(folder_url), "model": dict(model), "config": fingerprint(resume_config)}


def new_run_id() -> str:
    return os.urandom(16).hex()


def read_run(directory: Path) -> dict | None:
    """The run that last used ``directory`` (its run.json), or None when there is none or it is not one."""
    try:
        run = json.loads(read_regular(directory / RUN, limit=MAX_RUN_BYTES))
    except (OSError, ValueError, RecursionError, CheckpointError):
        return None
    try:
        return _check_run(run)
    except ValueError:
        return None


def write_run(directory: Path, run: dict) -> None:
    write_file_durably(directory / RUN, json.dumps(run, sort_keys=True).encode(), mode=0o600)


def foreign(record: dict, run: dict, *, rank: int, world_size: int, layout: dict) -> str | None:
    """Why the (checked) ``record`` is not a snapshot of rank ``rank`` of the run ``run`` on
    ``layout`` (None: it is one)."""
    if record["world_size"] != world_size or record["layout"] != layout:
        return f"taken on layout {record['layout']} of {record['world_size']} rank(s); this run's is {layout}"
    if record["rank"] != rank:
        return f"rank {record['rank']}'s snapshot, where rank {rank}'s belongs"
    theirs = record["run"]
    if theirs["folder"] != run["folder"]:
        return f"another run's: its checkpoint folder is {theirs['folder']}, this run's is {run['folder']}"
    if theirs["model"] != run["model"]:
        return f"another run's: its model is {_model_text(theirs['model'])}, this run's is {_model_text(run['model'])}"
    if theirs["config"] != run["config"]:
        return ("another run's: its run config differs from this run's (seed, data, optimizer or model settings; "
                f"fingerprint {theirs['config'][:8]}, this run's {run['config'][:8]})")
    if theirs["id"] != run["id"]:
        return (f"another run's: taken by run {theirs['id'][:8]}, this is run {run['id'][:8]} (a new run: its "
                "checkpoint folder did not exist when it started)")
    return None


def _model_text(model: dict) -> str:
    return " ".join(str(value) for value in model.values()) or "unnamed"


# --- the private directory ----------------------------------------------------------------------

def default_dir(identity: dict) -> Path:
    """Where a run keeps its snapshots unless told: /dev/shm (tmpfs: outlives the process, not
    the host) under a name of this user's, the checkpoint folder's canonical location and the
    run's model and config (``run_identity``)."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))
    return base / (_default_prefix(identity) + fingerprint([identity["model"], identity["config"]])[:8])


def _default_prefix(identity: dict) -> str:
    return f"cairn-{os.geteuid()}-{fingerprint(identity['folder'])[:12]}-"


def remove_other_configs(directory: Path, identity: dict) -> list[Path]:
    """The default directories of earlier runs on the same checkpoint folder with another model
    or config (siblings of ``directory`` under one name prefix): removed, so a changed config does
    not leave its snapshots in host memory. Only this user's private ones; the folder's lease
    (held by this run) says no run uses them."""
    removed = []
    prefix = _default_prefix(identity)
    for sibling in directory.parent.glob(prefix + "*"):
        try:
            info = os.lstat(sibling)
        except OSError:
            continue
        if sibling == directory or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() \
                or stat.S_IMODE(info.st_mode) != 0o700:
            continue
        shutil.rmtree(sibling, ignore_errors=True)
        removed.append(sibling)
    return removed


def open_private_dir(path: str | os.PathLike) -> Path:
    """``path`` (absolute) as a directory only this user can enter: created mode 0700 (with any
    missing parents) when absent; MemoryDirError naming it and why when it, or the way to it, is
    not safe (see the module's docstring)."""
    path = Path(os.path.abspath(path))
    _check_way_to(path.parent)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _check_way_to(path.parent)
    created = False
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        what = "a symbolic link" if e.errno == errno.ELOOP or os.path.islink(path) else "not a directory" \
            if e.errno == errno.ENOTDIR else f"not usable ({e.strerror})"
        raise MemoryDirError(f"{path} is {what}; a memory directory must be a real directory of this user's "
                             "(remove it, or choose another --checkpoint.memory_dir)") from None
    try:
        info = os.fstat(fd)
        if info.st_uid != os.geteuid():
            raise MemoryDirError(f"{path} belongs to uid {info.st_uid}, not to this user ({os.geteuid()}); another "
                                 "user may have made it to see or change the snapshots (remove it, or choose "
                                 "another --checkpoint.memory_dir)")
        if created:
            os.fchmod(fd, 0o700)  # whatever the umask
        elif stat.S_IMODE(info.st_mode) != 0o700:
            raise MemoryDirError(f"{path} has mode {stat.S_IMODE(info.st_mode):o}, not 700: other users could read "
                                 "or change its snapshots (give --checkpoint.memory_dir a directory of its own, e.g. "
                                 f"{path / 'cairn'}, or remove this one)")
    finally:
        os.close(fd)
    return path


def _check_way_to(path: Path) -> None:
    """Every directory on the way to ``path`` is one no other user can swap (see ``open_private_dir``)."""
    me = os.geteuid()
    here = Path(path.anchor)
    for part in path.parts[1:]:
        here = here / part
        try:
            info = os.lstat(here)
        except FileNotFoundError:
            return  # made by us from here on
        if stat.S_ISLNK(info.st_mode) and info.st_uid not in (0, me):
            raise MemoryDirError(f"{here} is a symbolic link of uid {info.st_uid}, on the way to the memory directory: "
                                 "another user decides where it leads (choose another --checkpoint.memory_dir)")
    here = Path(path.anchor)
    for part in Path(os.path.realpath(path)).parts[1:]:
        here = here / part
        try:
            info = os.stat(here)
        except FileNotFoundError:
            return
        writable_by_others = info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX
        if info.st_uid not in (0, me) or writable_by_others:
            why = "writable by every user" if writable_by_others else f"owned by uid {info.st_uid}"
            raise MemoryDirError(f"{here} is {why}, on the way to the memory directory: another user could swap what "
                                 "lies under it (choose another --checkpoint.memory_dir)")


def _private_subdir(path: Path) -> None:
    """A directory of this user's at ``path`` inside the private directory; a link or file there is removed."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None and not stat.S_ISDIR(info.st_mode):
        logger.warning("%s is %s, not a directory: removed (a memory directory is never followed elsewhere)",
                       path, file_kind(info.st_mode))
        os.unlink(path)
        info = None
    if info is None:
        os.mkdir(path, 0o700)
    elif info.st_uid != os.geteuid():
        raise MemoryDirError(f"{path} belongs to uid {info.st_uid}, not to this user")


def _sanitize(path: Path) -> None:
    """Remove what lies at ``path`` (a slot's file) unless it is a regular file of this user's with one name."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid() and info.st_nlink == 1:
        return
    why = file_kind(info.st_mode) if not stat.S_ISREG(info.st_mode) else f"a file of uid {info.st_uid}" \
        if info.st_uid != os.geteuid() else f"a file of {info.st_nlink} names (hard links)"
    logger.warning("memory snapshot file %s is %s: removed, never followed", path, why)
    if stat.S_ISDIR(info.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        os.unlink(path)


# --- the slots -----------------------------------------------------------------------------------

def chunk_hashes(view: memoryview, pool: concurrent.futures.Executor) -> list[str]:
    """xxh3-128 of each ``CHUNK`` bytes of ``view``, hashed in parallel (xxhash releases the GIL)."""
    return list(pool.map(lambda start: xxhash.xxh3_128(view[start:start + CHUNK]).hexdigest(),
                         range(0, len(view), CHUNK)))


class Mapped:
    """A map of the first ``size`` bytes of the regular file ``path``, to read (an empty view for
    0); UnusableSnapshotError naming it when it is shorter, before anything is mapped."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size
        self._map = None

    def __enter__(self) -> memoryview:
        if not self.size:
            return memoryview(b"")
        fd = open_regular(self.path)
        try:
            have = os.fstat(fd).st_size
            if have < self.size:
                raise UnusableSnapshotError(f"{self.path}: {have} bytes, the snapshot recorded {self.size}")
            # copy-on-write: writable for torch.frombuffer, never written
            self._map = mmap.mmap(fd, self.size, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)
        return self._view

    def __exit__(self, *exc) -> None:
        if self._map is not None:
            self._view.release()
            self._map.close()


class Slot:
    """One snapshot's place on this node: ``data.bin``, ``state.pt`` and ``COMMITTED``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._known: tuple[tuple, dict | None] | None = None  # (COMMITTED's identity, its record)

    @property
    def data(self) -> Path:
        return self.folder / DATA

    def read_record(self) -> dict | None:
        """The slot's record, checked whole; None when it holds no snapshot (no COMMITTED);
        UnusableSnapshotError naming the file and why when it is not a snapshot's record."""
        path = self.folder / COMMITTED
        try:
            raw = read_regular(path, limit=MAX_RECORD_BYTES)
        except FileNotFoundError:
            return None
        except (OSError, CheckpointError) as e:
            raise UnusableSnapshotError(_reason(path, e)) from None
        try:
            return check_record(json.loads(raw))
        except (ValueError, RecursionError) as e:
            raise UnusableSnapshotError(f"{path}: {e}") from None

    def record(self) -> dict | None:
        """The slot's record, or None when it holds no usable one. Read again only when COMMITTED
        changed (its inode, size or times): choosing a slot, on the training thread, reads and
        checks each record once."""
        try:
            info = os.lstat(self.folder / COMMITTED)
        except OSError:
            return None
        key = (info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        if self._known is None or self._known[0] != key:
            try:
                self._known = (key, self.read_record())
            except UnusableSnapshotError:
                self._known = (key, None)
        return self._known[1]

    def invalidate(self) -> None:
        (self.folder / COMMITTED).unlink(missing_ok=True)

    def commit(self, record: dict) -> None:
        write_file_durably(self.folder / COMMITTED, json.dumps(record).encode(), mode=0o600)
        self.record()  # read back and checked here, by the committing thread: the training thread finds it known

    def read_state(self, record: dict) -> bytes:
        """state.pt, read only when it is a regular file of the recorded size, and checked
        against its recorded checksum; UnusableSnapshotError naming it otherwise."""
        path = self.folder / STATE
        try:
            state = read_regular(path, limit=record["state_bytes"])
        except (OSError, CheckpointError) as e:
            raise UnusableSnapshotError(_reason(path, e)) from None
        if len(state) != record["state_bytes"]:
            raise UnusableSnapshotError(f"{path}: {len(state)} bytes, the snapshot recorded {record['state_bytes']}")
        if xxhash.xxh3_128(state).hexdigest() != record["state_xxh3"]:
            raise UnusableSnapshotError(f"{path}: checksum mismatch")
        return state

    def write_state(self, state: bytes) -> None:
        write_file_durably(self.folder / STATE, state, mode=0o600)

    def data_bytes_held(self) -> int:
        """The size of data.bin (0 when there is none, or something else lies there)."""
        try:
            info = os.lstat(self.data)
        except OSError:
            return 0
        return info.st_size if stat.S_ISREG(info.st_mode) else 0

    def open_data(self, size: int):
        """``data.bin`` opened to be written in place, at least ``size`` bytes long."""
        _sanitize(self.data)
        f = os.fdopen(open_own_file(self.data), "r+b")
        if os.fstat(f.fileno()).st_size < size:
            f.truncate(size)
        return f

    def problems(self, record: dict, pool: concurrent.futures.Executor) -> list[str]:
        """What does not match the record: sizes, the checksum of state.pt and of each chunk of data.bin."""
        try:
            self.read_state(record)
            with Mapped(self.data, record["data_bytes"]) as view:
                hashes = chunk_hashes(view, pool)
        except UnusableSnapshotError as e:
            return [str(e)]
        except (OSError, CheckpointError) as e:
            return [_reason(self.data, e)]
        bad = [i for i, (a, b) in enumerate(zip(hashes, record["chunks"])) if a != b]
        if bad:
            return [f"{self.data}: checksum mismatch in {CHUNK >> 20} MiB chunk(s) {bad}"]
        return []


def _reason(path: Path, error: Exception) -> str:
    text = str(error) if isinstance(error, CheckpointError) else (error.strerror or str(error))
    return text if str(path) in text else f"{path}: {text}"


def own_slots(directory: Path, rank: int, count: int = SLOTS) -> list[Slot]:
    """The ``count`` slots of ``rank``'s own snapshots."""
    return [Slot(directory / f"rank-{rank}" / f"slot-{i}") for i in range(count)]


def replica_slots(directory: Path, owner: int) -> list[Slot]:
    """The slots of the replicas of ``owner``'s snapshots this node keeps."""
    return [Slot(directory / f"replica-of-{owner}" / f"slot-{i}") for i in range(SLOTS)]


def make_slots(slots: list[Slot]) -> None:
    """The slots' folders, inside a private directory (``open_private_dir``); anything where a
    slot's file belongs that is not a regular file of this user's with one name is removed."""
    for slot in slots:
        _private_subdir(slot.folder.parent)
        _private_subdir(slot.folder)
        for name in (DATA, STATE, COMMITTED, DATA + ".tmp", STATE + ".tmp", COMMITTED + ".tmp"):
            _sanitize(slot.folder / name)


def landing_file(path: Path):
    """A new file at ``path`` (whatever lay there removed, never followed), to write a received replica into."""
    _sanitize(path)
    path.unlink(missing_ok=True)
    return os.fdopen(open_own_file(path, os.O_RDWR | os.O_CREAT | os.O_EXCL), "wb")


def progress_path(directory: Path, rank: int) -> Path:
    return directory / f"progress-{rank}"


def read_progress(path: Path) -> int | None:
    """The last step a rank trained, or None when it has not said (or the file is not 8 bytes of one)."""
    try:
        raw = read_regular(path, limit=8)
    except (OSError, CheckpointError):
        return None
    return int.from_bytes(raw, "little") if len(raw) == 8 else None


def write_progress(path: Path, step: int) -> None:
    """The last step this rank trained (8 bytes, replaced): what a restart counts steps lost from."""
    try:
        write_file_durably(path, step.to_bytes(8, "little"), mode=0o600, sync=False)
    except OSError:
        pass


# --- records --------------------------------------------------------------------------------------

def check_record(record: Any) -> dict:
    """``record`` (a parsed COMMITTED) when every field is what a snapshot writes: types, sizes,
    offsets and counts agree with each other; ValueError naming the first field that does not."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    for key in ("step", "rank", "world_size", "data_bytes", "state_bytes"):
        _natural(record.get(key), key)
    if not record["rank"] < record["world_size"]:
        raise ValueError(f"rank {record['rank']} of a world of {record['world_size']}")
    if record["state_bytes"] > MAX_STATE_BYTES:
        raise ValueError(f"state_bytes {record['state_bytes']} is more than a state.pt holds ({MAX_STATE_BYTES})")
    if not isinstance(record.get("layout"), dict):
        raise ValueError("layout is not a JSON object")
    if not isinstance(record.get("created_unix"), (int, float)) or isinstance(record.get("created_unix"), bool):
        raise ValueError("created_unix is not a number")
    _check_run(record.get("run"))
    _hex(record.get("state_xxh3"), "state_xxh3")
    chunks = record.get("chunks")
    if not isinstance(chunks, list) or len(chunks) != -(-record["data_bytes"] // CHUNK):
        raise ValueError(f"chunks is not a list of {-(-record['data_bytes'] // CHUNK)} checksums "
                         f"(one per {CHUNK >> 20} MiB of data_bytes {record['data_bytes']})")
    for chunk in chunks:
        _hex(chunk, "a chunk's checksum")
    leaves = record.get("leaves")
    if not isinstance(leaves, list):
        raise ValueError("leaves is not a list")
    spans = []
    for index, leaf in enumerate(leaves):
        spans += _check_leaf(leaf, index, record["data_bytes"])
    end = 0
    for start, stop, path in sorted(spans):
        if start < end:
            raise ValueError(f"leaf {path!r} overlaps the one before it (offset {start} < {end})")
        end = stop
    if end != record["data_bytes"]:
        raise ValueError(f"data_bytes is {record['data_bytes']}, the leaves end at {end}")
    return record


def _check_leaf(leaf: Any, index: int, data_bytes: int) -> list[tuple[int, int, str]]:
    """A leaf's (start, stop, path) in data.bin ([] when it holds no bytes); ValueError naming
    what is wrong. (Messages are made only on failure: a snapshot's choice of slot reads its
    records on the training thread.)"""
    if not isinstance(leaf, dict) or not isinstance(leaf.get("path"), str):
        raise ValueError(f"leaf {index} is not an object with a path")
    path, shape, nbytes, offset = leaf["path"], leaf.get("shape"), leaf.get("nbytes"), leaf.get("offset")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"leaf {path!r}: shape {str(shape)[:80]} is not a list of at most {MAX_DIMS} sizes")
    itemsize = _itemsize(leaf.get("dtype"))
    if itemsize is None:
        raise ValueError(f"leaf {path!r}: dtype {str(leaf.get('dtype'))[:40]!r} is not a torch dtype")
    if type(nbytes) is not int or nbytes != math.prod(shape) * itemsize:  # noqa: E721 - a bool is not a size
        raise ValueError(f"leaf {path!r}: nbytes {str(nbytes)[:40]!r}, its shape {shape} of {leaf['dtype']} is "
                         f"{math.prod(shape) * itemsize} bytes")
    if offset is None and nbytes == 0:
        return []
    if type(offset) is not int or offset < 0:  # noqa: E721
        raise ValueError(f"leaf {path!r}: offset is {str(offset)[:40]!r}, not an integer >= 0")
    if offset + nbytes > data_bytes:
        raise ValueError(f"leaf {path!r}: bytes {offset}..{offset + nbytes} lie past data_bytes {data_bytes}")
    return [(offset, offset + nbytes, path)] if nbytes else []


_ITEMSIZES: dict[str, int] = {}  # dtype name -> bytes per element, learnt on first sight


def _itemsize(name: Any) -> int | None:
    if not isinstance(name, str):
        return None
    if name not in _ITEMSIZES:
        try:
            _ITEMSIZES[name] = dtype_named(name).itemsize
        except ValueError:
            return None
    return _ITEMSIZES[name]


def _check_run(run: Any) -> dict:
    if not isinstance(run, dict) or not all(isinstance(run.get(key), str) for key in ("id", "folder", "config")) \
            or not isinstance(run.get("model"), dict):
        raise ValueError("run is not an object with an id, a folder, a model and a config")
    return run


def _natural(value: Any, name: str) -> int:
    if type(value) is not int or value < 0:  # noqa: E721 - a bool is not a size
        raise ValueError(f"{name} is {str(value)[:40]!r}, not an integer >= 0")
    return value


def _hex(value: Any, name: str) -> None:
    if not isinstance(value, str) or not _HEX128.fullmatch(value):
        raise ValueError(f"{name} is not an xxh3-128 checksum")


# --- listing (cairn checkpoint ls --memory) -------------------------------------------------------

def list_snapshots(directory: str | os.PathLike, checksums: bool = False) -> list[dict]:
    """Every slot of a node's memory folder, newest step first: whose, which step, committed or
    not, bytes, layout, time, run; ``unusable``: why a slot's record cannot be a snapshot (and
    with ``checksums``, ``problems``: what of its files does not match its record)."""
    base = Path(directory)
    rows = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        for holder in sorted([*base.glob("rank-*"), *base.glob("replica-of-*")]):
            folders = sorted(holder.glob("slot-*")) if _real_dir(holder) else [holder]
            for folder in folders:
                rows.append(_row(holder, folder, checksums, pool))
    progress = {}
    for path in base.glob("progress-*"):
        if path.name.removeprefix("progress-").isdigit():
            progress[int(path.name.removeprefix("progress-"))] = read_progress(path)
    for row in rows:
        owner = row["holder"].rpartition("-")[2]
        row["rank"] = int(owner) if owner.isdigit() else None
        row["trained_to"] = progress.get(row["rank"]) if row["holder"].startswith("rank-") else None
    return sorted(rows, key=lambda r: (r["step"] is None, -(r["step"] or 0), r["holder"]))


def _row(holder: Path, folder: Path, checksums: bool, pool) -> dict:
    slot = Slot(folder)
    record, unusable = None, None
    if not _real_dir(folder):
        unusable = f"{folder} is a symbolic link or not a directory; never followed"
    else:
        try:
            record = slot.read_record()
        except UnusableSnapshotError as e:
            unusable = str(e)
    try:
        info = os.lstat(slot.data)
        size = info.st_size if stat.S_ISREG(info.st_mode) else 0
    except OSError:
        size = 0
    row = {"holder": holder.name, "slot": folder.name, "path": str(folder),
           "step": record["step"] if record else None, "committed": record is not None,
           "bytes": record["data_bytes"] if record else size,
           "layout": record["layout"] if record else None,
           "created_unix": record["created_unix"] if record else None,
           "run": record["run"]["id"] if record else None, "unusable": unusable}
    if checksums and record:
        row["problems"] = slot.problems(record, pool)
    return row


def _real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False
