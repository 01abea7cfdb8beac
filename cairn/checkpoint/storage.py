"""Checkpoint storage: step discovery, the commit protocol, integrity checks, safe reads.

Everything the checkpoint manager puts on disk goes through ``CheckpointStorage``. The
manager decides *when* and *what*; this module decides *how it lands*, so that a reader
never sees a partial step and a crash at any moment leaves the older steps loadable.

On disk, under ``checkpoint.folder``::

    step-<N>/                  a committed step; the only names readers look at
        .metadata              DCP metadata, stock format
        __<rank>_<i>.distcp    DCP data files, stock format
        cairn_manifest.json    size + xxh3-128 of every file, step, versions, the caller's info
    .tmp-step-<N>[-<tag>]/     staging dir of a save in flight, or the leftover of a crashed one
    .trash-<name>-<id>/        a step being deleted (renamed away first, then removed)
    .replaced-step-<N>/        the previous step-N while a replace falls back to two renames

The commit protocol of ``CheckpointStorage.writer`` (sync and ``dcp.async_save`` alike):

1. the coordinator empties ``.tmp-step-N`` in ``prepare_global_plan``, which DCP runs on
   the coordinator before it hands any rank its plan, so no rank writes into leftovers;
2. every rank writes its files there, hashing each byte as it is written, and fsyncs each
   file; sizes and hashes travel back to the coordinator inside the ``WriteResult`` list;
   ``torch.save``'s per-record CRC32 is switched off meanwhile (see ``_zip_crc32_off``);
3. the coordinator, in ``finish``: DCP's ``.metadata`` (fsynced), then the manifest
   (fsynced), then an fsync of the staging dir;
4. one ``rename(.tmp-step-N, step-N)`` publishes the step, then the folder is fsynced.

A step therefore becomes visible only once it is complete on every rank. Replacing an
existing ``step-N`` swaps the two directories atomically with Linux
``renameat2(RENAME_EXCHANGE)``; where that call is missing (not Linux, old glibc, a
filesystem without it), the old copy is first renamed to ``.replaced-step-N``, which
``committed_steps``/``step_dir`` treat as step N until the new one is in place and which
``cleanup_incomplete`` restores if a crash hits between the two renames.

Fault injection for crash tests: ``CAIRN_FAULT=<point>`` SIGKILLs the process at that
point (in the writer process of an async save: it and the training process),
``CAIRN_FAULT=<point>:enospc`` raises ``OSError(ENOSPC)`` there instead,
``CAIRN_FAULT=<point>:exit`` ends only the process that reaches it (exit code 99), and
``CAIRN_FAULT_RANK=<r>`` limits it to one rank. Points: ``before_data`` (staging dir made,
nothing written), ``mid_data`` (after the first bytes of the first data file),
``after_data_before_commit`` (every data file written, no ``.metadata`` yet),
``during_publish`` (manifest written, right before the publishing rename),
``during_replace`` (replacing step-N: after the swap, before the old copy is removed; in
the two-rename fallback, between the two renames),
``during_purge`` (a purged step renamed to trash, not yet removed). Unset, each point costs
one dictionary lookup per save.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime
import enum
import errno
import functools
import io
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

import cairn

logger = logging.getLogger("cairn")

MANIFEST_NAME = "cairn_manifest.json"
METADATA_NAME = ".metadata"  # DCP's own name for its metadata file
MANIFEST_FORMAT = "cairn-checkpoint"
MANIFEST_VERSION = 1
CHECKSUM_ALGORITHM = "xxh3_128"
HF_INDEX_NAME = "model.safetensors.index.json"
SAVE_ID_PREFIX = "cairn-"

FAULT_ENV = "CAIRN_FAULT"
FAULT_RANK_ENV = "CAIRN_FAULT_RANK"
FAULT_EXIT_CODE = 99
WRITER_PROCESS_ENV = "CAIRN_WRITER_PROCESS"  # set in an async save's writer process
FAULT_POINTS = ("before_data", "mid_data", "after_data_before_commit", "during_publish", "during_replace",
                "during_purge")

_STEP_RE = re.compile(r"^step-(\d+)$")
_STAGING_RE = re.compile(r"^\.tmp-step-(\d+)(?:-.+)?$")
_ASIDE_RE = re.compile(r"^\.replaced-step-(\d+)$")
_TRASH_PREFIX = ".trash-"
_CHUNK_BYTES = 8 << 20
# The manifest's own keys; the caller's ``info`` may not reuse them.
_RESERVED_KEYS = frozenset({"format", "format_version", "step", "storage", "created", "created_unix",
                            "torch_version", "cairn_version", "checksum_algorithm", "files", "total_bytes",
                            "entries", "manifest_checksum"})
# The WriteResult that carries a rank's file sizes and hashes to the coordinator; stripped
# before DCP's metadata is written, so stock readers never see it.
_FILES_RESULT_PREFIX = "__cairn_files__/"


class CheckpointError(Exception):
    """A checkpoint problem the user can act on; the message names the file, step or flag."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files do not match what was written; ``problems`` lists each one."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems)

    def __reduce__(self):  # DCP pickles rank failures to the coordinator
        return (type(self), (str(self), self.problems))


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that would run code if loaded the stock way; it was refused unread."""


def find_checkpoint_error(exc: BaseException) -> CheckpointError | None:
    """The CheckpointError behind ``exc``, also from inside DCP's per-rank CheckpointException."""
    if isinstance(exc, CheckpointError):
        return exc
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        for rank in sorted(failures):
            error = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
            if isinstance(error, CheckpointError):
                return error
    return None


def _corrupt(step_dir: Path, problems: Sequence[str]) -> CorruptCheckpointError:
    shown = list(problems[:5]) + ([f"... and {len(problems) - 5} more"] if len(problems) > 5 else [])
    return CorruptCheckpointError(
        f"checkpoint {step_dir} is corrupt:\n  - " + "\n  - ".join(shown)
        + f"\n(details: `cairn checkpoint verify {step_dir}`)", problems)


# --- fault injection ---------------------------------------------------------------------

def fault_point(point: str, rank: int | None = None) -> None:
    """Crash here (or raise ENOSPC) if ``CAIRN_FAULT`` names this point; see the module doc."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, action = spec.partition(":")
    if name != point:
        return
    only_rank = os.environ.get(FAULT_RANK_ENV)
    if only_rank is not None and rank is not None and int(only_rank) != rank:
        return
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {FAULT_ENV}={spec})")
    if action == "exit":  # this process alone ends (the writer process dying under a live trainer)
        sys.stderr.write(f"cairn: {FAULT_ENV}={spec}: pid {os.getpid()} exits at {point}\n")
        sys.stderr.flush()
        os._exit(FAULT_EXIT_CODE)
    sys.stderr.write(f"cairn: {FAULT_ENV}={spec}: killing pid {os.getpid()} at {point}\n")
    sys.stderr.flush()
    if os.environ.get(WRITER_PROCESS_ENV):  # in the writer process: the training process dies too
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


# --- small filesystem helpers -------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    """Make renames and new entries in ``path`` durable (no-op where dirs cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_file(path: Path, on_bytes: Callable[[int], None] | None = None) -> tuple[int, str]:
    """(size, xxh3-128 hex) of a file, read in large chunks."""
    digest = xxhash.xxh3_128()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(min(_CHUNK_BYTES, os.fstat(f.fileno()).st_size + 1))
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
            if on_bytes is not None:
                on_bytes(n)
    return size, digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the platform or filesystem cannot."""
    fn = _renameat2()
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _remove_tree(path: Path) -> bool:
    """Delete a directory tree; log and return False on failure instead of raising."""
    def ignore_vanished(function, name, error):
        error = error[1] if isinstance(error, tuple) else error
        if not isinstance(error, FileNotFoundError):  # another thread may be deleting the same trash
            raise error

    try:
        if sys.version_info >= (3, 12):
            shutil.rmtree(path, onexc=ignore_vanished)
        else:
            shutil.rmtree(path, onerror=ignore_vanished)
        return True
    except FileNotFoundError:
        return True
    except OSError as e:
        logger.warning("could not delete %s (%s); cleanup_incomplete() will retry at the next start", path, e)
        return False


def _discard(path: Path) -> bool:
    """Rename ``path`` to a trash name (one atomic step out of sight), then delete it.

    Used after a commit: failures are logged, never raised (the new step is already live).
    """
    trash = path.parent / f"{_TRASH_PREFIX}{path.name.lstrip('.')}-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, trash)
    except OSError as e:
        logger.warning("could not remove %s (%s); cleanup_incomplete() will retry at the next start", path, e)
        return False
    _fsync_dir(path.parent)
    return _remove_tree(trash)


def _has_commit_marker(step_dir: Path) -> bool:
    return (step_dir / MANIFEST_NAME).is_file() or (step_dir / METADATA_NAME).is_file()


def is_hf_dir(path: str | os.PathLike) -> bool:
    """True for a Hugging Face safetensors directory (an index or ``*.safetensors``, no DCP metadata)."""
    path = Path(path)
    if not path.is_dir() or (path / METADATA_NAME).exists():
        return False
    return (path / HF_INDEX_NAME).is_file() or any(path.glob("*.safetensors"))


# --- manifest ------------------------------------------------------------------------------

def _json_default(value: Any) -> Any:
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, torch.Size):
        return list(value)
    return str(value)


def _normalize_info(info: Mapping[str, Any] | None) -> dict[str, Any]:
    info = dict(info or {})
    clashes = sorted(_RESERVED_KEYS & set(info))
    if clashes:
        raise ValueError(f"checkpoint info may not set the manifest's own keys {clashes}")
    # Through JSON once, so what is hashed is exactly what a reader will parse.
    return json.loads(json.dumps(info, default=_json_default))


# The checksum is the file's last member, so the bytes it covers are exactly the bytes on
# disk before it: any changed byte anywhere shows, and the file stays plain JSON.
_CHECKSUM_SUFFIX = re.compile(rb',\n "manifest_checksum": "([0-9a-f]{32})"\n}\n\Z')


def _manifest_bytes(body: dict[str, Any]) -> bytes:
    # One top-level member per line, each encoded by json's C encoder (``indent`` would select
    # the pure-Python one, which holds the GIL ~10x longer while training runs beside it).
    if not body:
        raise ValueError("a manifest body must be a non-empty JSON object")
    members = [f" {json.dumps(str(key))}: {json.dumps(body[key], sort_keys=True, default=_json_default)}"
               for key in sorted(body)]
    text = ("{\n" + ",\n".join(members) + "\n}").encode()
    checksum = xxhash.xxh3_128(text).hexdigest()
    return text[:-2] + f',\n "manifest_checksum": "{checksum}"\n}}\n'.encode()


def _parse_manifest(raw: bytes, path: Path) -> dict[str, Any]:
    """The manifest's dict; CorruptCheckpointError if any byte differs from what was written."""
    match = _CHECKSUM_SUFFIX.search(raw)
    if match is None:
        raise _corrupt(path.parent, [f"{path}: not a cairn manifest, or damaged (its checksum line is missing "
                                     "or malformed)"])
    body = raw[:match.start()] + b"\n}"
    if xxhash.xxh3_128(body).hexdigest() != match.group(1).decode():
        raise _corrupt(path.parent, [f"{path}: manifest checksum mismatch (the manifest was modified)"])
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:  # only if the writer itself was broken
        raise _corrupt(path.parent, [f"{path}: not valid JSON ({e})"]) from None
    if not isinstance(document, dict):
        raise _corrupt(path.parent, [f"{path}: not a JSON object"])
    return document


def _write_file_durably(path: Path, data: bytes) -> None:
    """Write through a temporary name, fsync, rename: ``path`` is whole or absent."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _entries_from_metadata(metadata: Metadata) -> tuple[dict[str, dict], dict[str, set[str]]]:
    """(per-FQN shape/dtype/files, per-file FQNs) derived from DCP's metadata."""
    files_of: dict[str, set[str]] = {}
    fqns_of: dict[str, set[str]] = {}
    for index, info in (metadata.storage_data or {}).items():
        relative_path = getattr(info, "relative_path", None)
        if relative_path is not None:
            files_of.setdefault(index.fqn, set()).add(relative_path)
            fqns_of.setdefault(relative_path, set()).add(index.fqn)
    entries: dict[str, dict] = {}
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            entry = {"type": "tensor", "dtype": str(item.properties.dtype).removeprefix("torch."),
                     "shape": list(item.size), "num_chunks": len(item.chunks)}
        elif isinstance(item, BytesStorageMetadata):
            entry = {"type": "object"}
        else:
            entry = {"type": type(item).__name__}
        entry["files"] = sorted(files_of.get(fqn, ()))
        entries[fqn] = entry
    return entries, fqns_of


def _build_manifest(step: int, storage: str, files: dict[str, dict], info: dict[str, Any],
                    checksums: bool, entries: dict[str, dict] | None = None) -> dict[str, Any]:
    now = time.time()
    body: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "step": step,
        "storage": storage,
        "created": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(timespec="seconds"),
        "created_unix": round(now, 3),
        "torch_version": torch.__version__,
        "cairn_version": cairn.__version__,
        "checksum_algorithm": CHECKSUM_ALGORITHM if checksums else None,
        "files": files,
        "total_bytes": sum(f["size"] for f in files.values()),
    }
    if entries is not None:
        body["entries"] = entries
    body.update(info)
    return body


# --- writing: hashing as bytes go out ------------------------------------------------------

_crc32_lock = threading.Lock()
_crc32_users = 0
_crc32_before = True


@contextlib.contextmanager
def _zip_crc32_off():
    """``torch.save`` without its per-record zip CRC32 while DCP serializes tensors.

    DCP writes every tensor with ``torch.save``, which computes a CRC32 over each record;
    ``torch.load`` never checks it (a flipped byte loads silently), and a ``.distcp`` file is
    not a zip archive any other tool opens, so the CRC buys nothing and costs the writer most
    of its time (torch.save ran at 1.8 GB/s with it, 8.9 GB/s without, on the H100 host of
    benchmarks/RESULTS.md). The manifest's xxh3-128, computed as bytes go out, is the check.
    The switch is process-wide (torch keeps one flag), so concurrent writers share it and the
    last one out restores the caller's setting.
    """
    global _crc32_users, _crc32_before
    with _crc32_lock:
        if _crc32_users == 0:
            _crc32_before = torch.serialization.get_crc32_options()
            torch.serialization.set_crc32_options(False)
        _crc32_users += 1
    try:
        yield
    finally:
        with _crc32_lock:
            _crc32_users -= 1
            if _crc32_users == 0:
                torch.serialization.set_crc32_options(_crc32_before)


_PARALLEL_HASH_BYTES = 1 << 20
_hash_pool_lock = threading.Lock()
_hash_pool_instance = None


def _hash_pool():
    """Threads that hash large writes while the writing thread is in the kernel (xxhash releases the GIL)."""
    global _hash_pool_instance
    with _hash_pool_lock:
        if _hash_pool_instance is None:
            from concurrent.futures import ThreadPoolExecutor

            _hash_pool_instance = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cairn-hash")
        return _hash_pool_instance


# Writeback is started every WRITEBACK_BYTES of a file (see start_writeback); the
# environment variable CAIRN_WRITEBACK_MB sets another size, 0 leaves writeback to the kernel.
WRITEBACK_BYTES = 64 << 20
WRITEBACK_ENV = "CAIRN_WRITEBACK_MB"


def writeback_bytes() -> int:
    """How often (bytes) a writer starts writeback: ``$CAIRN_WRITEBACK_MB`` MiB, else
    ``WRITEBACK_BYTES``; 0 for never."""
    value = os.environ.get(WRITEBACK_ENV, "").strip()
    if not value:
        return WRITEBACK_BYTES
    try:
        megabytes = float(value)
    except ValueError:
        megabytes = -1.0
    if not megabytes >= 0:
        raise CheckpointError(f"{WRITEBACK_ENV}={value!r}: expected a number of MiB >= 0 (0 leaves writeback "
                              "to the kernel)")
    return int(megabytes * (1 << 20))


def _load_sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # a CDLL call releases the GIL
        function = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Ask the kernel to start writing ``fd``'s dirty pages in ``offset .. offset + length`` to
    disk now, without waiting for them (Linux ``sync_file_range(SYNC_FILE_RANGE_WRITE)``);
    False where the platform or filesystem has no such call. Durability still comes from the
    fsync at the file's end.

    Without it Linux starts writing a file's dirty pages only once a tenth or so of the host's
    memory is dirty (``vm.dirty_background_ratio``) or after 30 s, so on a large host a save of
    many GB fills the page cache with the disk idle and then waits for the whole of it in the
    final fsync: the save takes copy time plus disk time instead of the larger of the two, and
    anything done alongside the copy (the checksum) adds to it. With writeback started as the
    bytes go out, the disk works from the first write on, and once its queue is full this call
    waits for it, which keeps the writer at the disk's pace.
    """
    if _sync_file_range is None or length <= 0:
        return False
    if _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE) != 0:
        return False  # e.g. ESPIPE, EINVAL on a filesystem without it: the fsync does it all
    return True


class _WriterFile:
    """A write-only file that hashes every byte on its way to the kernel (``hashing``) and
    starts the disk's writeback each time ``writeback_every`` more bytes were written (0: never).

    A large write is hashed on a pool thread while this thread copies it into the kernel, so
    the hash costs the save little beyond the write itself; ``write`` returns once both are
    done (the caller may reuse its buffer), which also keeps the hash in file order.
    """

    def __init__(self, file: io.BufferedWriter, hashing: bool, writeback_every: int, fault_mid_data: bool,
                 rank: int | None):
        self._file = file
        self._digest = xxhash.xxh3_128() if hashing else None
        self.size = 0
        # A seek means bytes may be overwritten: the running hash no longer describes the
        # file, so the writer re-reads it instead.
        self.hash_valid = hashing
        self._writeback_every = writeback_every
        self._size_at_writeback = 0  # self.size when writeback was last started
        self._written_back = 0  # file offset up to which it was started
        self._fault_mid_data = fault_mid_data
        self._rank = rank
        # Seconds this file's writer spent on the hash beyond its writes: small writes hashed
        # inline, and waits for a large write's hash after the kernel had taken the bytes.
        self.hash_wait_s = 0.0

    def write(self, data) -> int:
        view = memoryview(data)
        if self._digest is None:
            self._file.write(view)
        elif view.nbytes >= _PARALLEL_HASH_BYTES:
            hashed = _hash_pool().submit(self._digest.update, view)
            try:
                self._file.write(view)
            finally:
                start = time.perf_counter()
                hashed.result()
                self.hash_wait_s += time.perf_counter() - start
        else:
            self._file.write(view)
            start = time.perf_counter()
            self._digest.update(view)
            self.hash_wait_s += time.perf_counter() - start
        self.size += view.nbytes
        if self._writeback_every and self.size - self._size_at_writeback >= self._writeback_every:
            self._writeback()
        if self._fault_mid_data:
            self._file.flush()
            fault_point("mid_data", self._rank)
        return view.nbytes

    def _writeback(self) -> None:
        self._size_at_writeback = self.size
        self._file.flush()
        end = self._file.tell()
        if end > self._written_back:  # where the call is missing, the final fsync does it all
            start_writeback(self._file.fileno(), self._written_back, end - self._written_back)
            self._written_back = end

    def hexdigest(self) -> str | None:
        return self._digest.hexdigest() if self.hash_valid else None

    def seek(self, *args) -> int:
        self.hash_valid = False
        return self._file.seek(*args)

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._file.tell()

    def flush(self) -> None:
        self._file.flush()

    def fileno(self) -> int:
        return self._file.fileno()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def close(self) -> None:
        self._file.close()


class _WriterFileSystem(FileSystem):
    """DCP's local filesystem, except that files opened for writing are ``_WriterFile``s:
    hashed as written (``checksums``), their writeback started every ``writeback_every`` bytes
    (0: never)."""

    def __init__(self, checksums: bool = True, writeback_every: int = WRITEBACK_BYTES) -> None:
        self.checksums = checksums
        self.writeback_every = writeback_every
        self.rank: int | None = None
        self.digests: dict[str, tuple[int, str | None]] = {}  # file name -> (size, hash or None)
        self.hash_wait_s: dict[str, float] = {}  # file name -> _WriterFile.hash_wait_s
        self.errors: list[tuple[str, BaseException]] = []

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        path = Path(path)
        fault_mid_data = os.environ.get(FAULT_ENV, "").partition(":")[0] == "mid_data"
        with open(path, mode) as f:
            stream = _WriterFile(f, self.checksums, self.writeback_every, fault_mid_data, self.rank)
            try:
                yield stream
            except BaseException as e:
                # DCP's helper threads drop their exceptions; keep them for write_data.
                self.errors.append((path.name, e))
                raise
            finally:
                stream.close()
            self.digests[path.name] = (stream.size, stream.hexdigest())
            self.hash_wait_s[path.name] = stream.hash_wait_s


def _new_save_id() -> str:
    # The prefix marks DCP metadata written by cairn, so a deleted manifest is noticed.
    return f"{SAVE_ID_PREFIX}{uuid.uuid4()}"


class CairnStorageWriter(FileSystemWriter):
    """DCP's FileSystemWriter with cairn's commit protocol (see the module doc).

    Build it with ``CheckpointStorage.writer(step, info)`` identically on every rank and pass
    it to ``dcp.save`` / ``dcp.async_save`` as ``storage_writer``. The step becomes visible
    as ``step-N`` only when ``finish`` has published it on the coordinator.
    """

    def __init__(self, folder: Path, step: int, info: Mapping[str, Any] | None = None, *,
                 checksums: bool = True, **writer_options: Any):
        self.folder = Path(folder)
        self.step = step
        self.final_dir = self.folder / f"step-{step}"
        self.staging_dir = self.folder / f".tmp-step-{step}"
        self.info = _normalize_info(info)
        self.checksums = checksums
        super().__init__(self.staging_dir, **writer_options)
        self.fs = _WriterFileSystem(checksums, writeback_bytes())  # the writer process gets it in the pickle
        self.save_id = _new_save_id()
        self.is_coordinator = False
        self.last_error: CheckpointError | None = None
        self.committed_at: float | None = None  # time.perf_counter() when the coordinator published the step
        # Set by async saves: writes this rank's files elsewhere (the writer process) and returns
        # what ``write_data`` would, the files result included.
        self.delegate: Callable[[CairnStorageWriter, SavePlan, SavePlanner], list[WriteResult]] | None = None

    def __getstate__(self):  # the writer process and process-based async saves pickle the writer
        state = dict(self.__dict__)
        state["last_error"] = None
        state["delegate"] = None
        return state

    @property
    def checkpoint_id(self) -> Path:
        return self.final_dir

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None and Path(checkpoint_id) not in (self.final_dir, self.staging_dir):
            raise CheckpointError(f"this writer saves step {self.step} into {self.final_dir}; "
                                  f"it cannot also write checkpoint_id={checkpoint_id}")
        self.save_id = _new_save_id()

    def storage_meta(self) -> StorageMeta | None:
        # The published location, as a plain string (no pathlib classes in the pickle).
        return StorageMeta(checkpoint_id=str(self.final_dir), save_id=self.save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)
        self.is_coordinator = is_coordinator
        if getattr(self, "rank", None) is None:  # a DCP that does not pass rank= to storage writers
            self.rank = kwargs.get("rank", dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)
        self.fs.rank = self.rank
        if not kwargs.get("use_collectives", True):
            raise CheckpointError("cairn's commit protocol needs DCP collectives (use_collectives=True): "
                                  "the coordinator must see every rank's files before publishing")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        # No mkdir here: the coordinator creates a clean staging dir in prepare_global_plan.
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if self.staging_dir.exists():
                logger.warning("removing leftovers of an earlier save of step %d in %s", self.step,
                               self.staging_dir)
                shutil.rmtree(self.staging_dir)
            self.staging_dir.mkdir()
            _fsync_dir(self.folder)
        except OSError as e:
            raise self._error("preparing", e) from e
        return super().prepare_global_plan(plans)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        try:
            fault_point("before_data", self.rank)
            if not self.staging_dir.is_dir():
                raise CheckpointError(
                    f"rank {self.rank}: staging dir {self.staging_dir} does not exist; the checkpoint folder "
                    "(--checkpoint.folder) must be on a filesystem that every rank shares")
            if self.delegate is not None:
                future: Future[list[WriteResult]] = Future()
                future.set_result(self.delegate(self, plan, planner))
                return future
            self.fs.digests, self.fs.hash_wait_s, self.fs.errors = {}, {}, []
            with _zip_crc32_off():
                results = super().write_data(plan, planner).value()
            if self.fs.errors:
                name, error = self.fs.errors[0]
                raise error
            if len(results) != len(plan.items):
                raise CheckpointError(f"rank {self.rank}: wrote {len(results)} of {len(plan.items)} items of "
                                      f"step {self.step} (a writer thread failed; see the log above)")
            results.append(self._files_result(results))
        except OSError as e:
            raise self._error("writing", e) from e
        except CheckpointError as e:
            self.last_error = e
            raise
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _files_result(self, results: list[WriteResult]) -> WriteResult:
        """This rank's files (size, hash, FQNs), as one extra result for the coordinator."""
        files: dict[str, dict] = {}
        for result in results:
            name = result.storage_data.relative_path
            files.setdefault(name, {"fqns": set()})["fqns"].add(result.index.fqn)
        digests = self.fs.digests
        for name, record in files.items():
            size, checksum = digests.get(name, (None, None))
            if self.checksums and checksum is None:  # not seen by our stream: hash it from page cache
                size, checksum = _hash_file(self.staging_dir / name)
            elif size is None:
                size = (self.staging_dir / name).stat().st_size
            record.update(size=size, checksum=checksum, fqns=sorted(record["fqns"]))
        return WriteResult(index=MetadataIndex(f"{_FILES_RESULT_PREFIX}{self.rank}"), size_in_bytes=0,
                           storage_data=files)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        try:
            fault_point("after_data_before_commit", self.rank)
            files: dict[str, dict] = {}
            dcp_results = []
            for rank_results in results:
                for result in rank_results:
                    if result.index.fqn.startswith(_FILES_RESULT_PREFIX):
                        files.update(result.storage_data)
                    else:
                        dcp_results.append(result)
            super().finish(metadata, [dcp_results])
            files[METADATA_NAME] = self._metadata_record()
            entries, _ = _entries_from_metadata(metadata)
            manifest = _build_manifest(self.step, "dcp", files, self.info, self.checksums, entries)
            _write_file_durably(self.staging_dir / MANIFEST_NAME, _manifest_bytes(manifest))
            _fsync_dir(self.staging_dir)
            publish_staging(self.folder, self.staging_dir, self.step)
            self.committed_at = time.perf_counter()
        except OSError as e:
            raise self._error("committing", e) from e
        except CheckpointError as e:
            self.last_error = e
            raise
        logger.info("committed checkpoint %s (%d files, %.1f MB)", self.final_dir, len(files),
                    manifest["total_bytes"] / 1e6)

    def _metadata_record(self) -> dict[str, Any]:
        digests = self.fs.digests
        size, checksum = digests.get(METADATA_NAME + ".tmp", (None, None))
        if self.checksums and checksum is None:
            size, checksum = _hash_file(self.staging_dir / METADATA_NAME)
        elif size is None:
            size = (self.staging_dir / METADATA_NAME).stat().st_size
        return {"size": size, "checksum": checksum}

    def _error(self, action: str, e: OSError) -> CheckpointError:
        hint = {errno.ENOSPC: " (disk full)", errno.EDQUOT: " (quota exceeded)", errno.EROFS: " (read-only)",
                errno.EACCES: " (permission denied)", errno.EPERM: " (not permitted: read-only folder?)",
                errno.EFBIG: " (file size limit)"}.get(e.errno, "")
        where = f"rank {self.rank}: " if self.rank is not None else ""
        error = CheckpointError(
            f"{where}{action} checkpoint step {self.step} in {self.staging_dir} failed: {e}{hint}. "
            f"Nothing was committed; earlier steps in --checkpoint.folder {self.folder} are untouched")
        self.last_error = error
        return error


# --- publishing --------------------------------------------------------------------------

def publish_staging(folder: Path, staging: Path, step: int) -> Path:
    """Atomically make the complete directory ``staging`` visible as ``folder/step-<step>``.

    ``staging`` must be in ``folder`` (a rename never crosses filesystems). An existing
    ``step-N`` is replaced with no moment where neither copy is a committed step N.
    """
    final = folder / f"step-{step}"
    fault_point("during_publish")
    try:
        os.rename(staging, final)  # replaces ``final`` only if it is an empty directory
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        _replace(folder, staging, final, step)
    _fsync_dir(folder)
    return final


def _replace(folder: Path, staging: Path, final: Path, step: int) -> None:
    if _exchange(staging, final):
        # The new step is live under ``final``; ``staging`` now holds the previous copy.
        _fsync_dir(folder)
        fault_point("during_replace")
        logger.info("replaced existing %s", final)
        _discard(staging)
        return
    aside = folder / f".replaced-step-{step}"
    if aside.exists():  # stale: ``final`` exists, so the aside copy is a leftover
        _remove_tree(aside)
    os.rename(final, aside)
    fault_point("during_replace")
    os.rename(staging, final)
    _fsync_dir(folder)
    logger.info("replaced existing %s (two renames; renameat2 RENAME_EXCHANGE unavailable)", final)
    _discard(aside)


# --- the storage facade --------------------------------------------------------------------

class CheckpointStorage:
    """Step discovery, commits, verification, purge and safe readers for one checkpoint folder."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} (--checkpoint.folder) exists and is not a "
                                  "directory")
        self._purge_lock = threading.Lock()

    # discovery

    def step_dir(self, step: int) -> Path:
        """``folder/step-<step>``; during (or after a crash in) a fallback replace, the aside copy."""
        path = self.folder / f"step-{step}"
        if not path.is_dir():
            aside = self.folder / f".replaced-step-{step}"
            if aside.is_dir() and _has_commit_marker(aside):
                return aside
        return path

    def committed_steps(self) -> list[int]:
        """Ascending steps whose ``step-N`` dir is committed (cairn manifest or stock DCP ``.metadata``)."""
        if not self.folder.is_dir():
            return []
        committed, asides = set(), set()
        with os.scandir(self.folder) as entries:
            for entry in entries:
                if (match := _STEP_RE.match(entry.name)) and entry.is_dir():
                    if _has_commit_marker(Path(entry.path)):
                        committed.add(int(match.group(1)))
                elif (match := _ASIDE_RE.match(entry.name)) and entry.is_dir():
                    if _has_commit_marker(Path(entry.path)):
                        asides.add(int(match.group(1)))
        committed |= {step for step in asides if not (self.folder / f"step-{step}").is_dir()}
        return sorted(committed)

    def read_manifest(self, step_dir: str | os.PathLike) -> dict | None:
        """The step's manifest, None for a dir without one (stock DCP); corrupt -> CorruptCheckpointError."""
        path = Path(step_dir) / MANIFEST_NAME
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        return _parse_manifest(raw, path)

    # writing

    def writer(self, step: int, info: Mapping[str, Any] | None = None, *, checksums: bool = True,
               **writer_options: Any) -> CairnStorageWriter:
        """A DCP StorageWriter that stages, hashes, and atomically commits ``step-<step>``.

        ``info`` (JSON-able) is merged into the manifest's top level. ``writer_options`` go to
        DCP's FileSystemWriter (``thread_count``, ``single_file_per_rank``, ...).
        """
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        return CairnStorageWriter(self.folder, step, info, checksums=checksums, **writer_options)

    def new_staging_dir(self, step: int, tag: str = "export") -> Path:
        """An empty ``.tmp-step-<step>-<tag>`` dir in the folder, for ``publish_dir``."""
        staging = self.folder / f".tmp-step-{step}-{tag}"
        self.folder.mkdir(parents=True, exist_ok=True)
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        return staging

    def publish_dir(self, staging: str | os.PathLike, step: int, info: Mapping[str, Any] | None = None, *,
                    storage: str | None = None) -> Path:
        """Commit a directory of plain files (e.g. an HF export) as ``step-<step>``.

        Every file is fsynced and hashed, the manifest written, and the directory published
        atomically, exactly as a DCP save. ``staging`` should come from ``new_staging_dir``;
        one elsewhere is copied into the folder first. ``storage`` defaults to "hf" for an
        HF directory, else "files".
        """
        staging = Path(staging)
        info = _normalize_info(info)
        if not staging.is_dir():
            raise CheckpointError(f"cannot publish step {step}: {staging} is not a directory")
        try:
            if staging.resolve().parent != self.folder.resolve():
                own = self.new_staging_dir(step, "publish")
                shutil.copytree(staging, own, dirs_exist_ok=True)
                staging = own
            (staging / MANIFEST_NAME).unlink(missing_ok=True)
            files = {}
            for path in sorted(p for p in staging.rglob("*") if p.is_file()):
                _fsync_file(path)
                size, checksum = _hash_file(path)
                files[path.relative_to(staging).as_posix()] = {"size": size, "checksum": checksum}
            for directory in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
                _fsync_dir(directory)
            kind = storage or ("hf" if is_hf_dir(staging) else "files")
            manifest = _build_manifest(step, kind, files, info, checksums=True)
            _write_file_durably(staging / MANIFEST_NAME, _manifest_bytes(manifest))
            _fsync_dir(staging)
            final = publish_staging(self.folder, staging, step)
        except OSError as e:
            raise CheckpointError(f"committing step {step} from {staging} failed: {e}. Nothing was committed; "
                                  f"earlier steps in --checkpoint.folder {self.folder} are untouched") from e
        logger.info("committed %s checkpoint %s (%d files)", kind, final, len(files))
        return final

    def discard_staging(self, step: int) -> None:
        """Remove the staging dir of a failed save of ``step`` (no-op if there is none)."""
        staging = self.folder / f".tmp-step-{step}"
        if staging.exists():
            _remove_tree(staging)

    # reading

    def reader(self, step_dir: str | os.PathLike, verify: bool = False):
        """A safe DCP StorageReader for ``step_dir`` (see ``cairn.checkpoint.safe_load``)."""
        from cairn.checkpoint.safe_load import SafeFileSystemReader

        return SafeFileSystemReader(step_dir, verify=verify)

    def load_planner(self, **planner_options: Any):
        """DefaultLoadPlanner whose non-tensor items load with ``torch.load(weights_only=True)``.

        ``planner_options``: DefaultLoadPlanner's (``allow_partial_load``, ...) and
        ``safe_globals`` (extra classes to admit, as ``torch.serialization.safe_globals``).
        """
        from cairn.checkpoint.safe_load import SafeLoadPlanner

        return SafeLoadPlanner(**planner_options)

    def load(self, state_dict: dict[str, Any], step_dir: str | os.PathLike, *, verify: bool = False,
             planner=None, process_group=None, no_dist: bool = False) -> None:
        """``dcp.load`` through ``reader`` and ``load_planner``, in place, on every rank.

        A problem found on any rank is raised on every rank as the CheckpointError itself
        (not DCP's CheckpointException wrapper), so callers can catch CorruptCheckpointError.
        """
        import torch.distributed.checkpoint as dcp

        reader = self.reader(step_dir, verify=verify)
        try:
            dcp.load(state_dict, storage_reader=reader, planner=planner or self.load_planner(),
                     process_group=process_group, no_dist=no_dist)
        except BaseException as e:
            error = reader.last_error or find_checkpoint_error(e)
            if error is not None and error is not e:
                raise error from e
            raise

    # integrity

    def verify(self, step_dir: str | os.PathLike, checksums: bool = True,
               progress: Callable[[int, int], None] | None = None, notes: list[str] | None = None) -> list[str]:
        """Every problem found in ``step_dir``, each naming its file (and what it holds); [] if sound.

        Checks the manifest, then each file's presence and size, then (``checksums``) its
        hash; for DCP dirs also that ``.metadata`` parses safely and every item it points to
        lies inside an existing file. A dir without a manifest (stock DCP) gets the structural
        checks only; that is said in ``notes`` (if given) and the log. ``progress(done, total)``
        is called with bytes hashed so far.
        """
        step_dir = Path(step_dir)
        notes = notes if notes is not None else []
        if not step_dir.is_dir():
            return [f"{step_dir}: no such checkpoint directory"]
        problems: list[str] = []
        manifest = None
        try:
            manifest = self.read_manifest(step_dir)
        except CorruptCheckpointError as e:
            problems.extend(e.problems)
        if manifest is not None:
            problems.extend(check_files(step_dir, manifest, checksums=checksums, progress=progress))
            if checksums and manifest.get("checksum_algorithm") is None:
                notes.append(f"{step_dir}: saved without checksums; sizes checked only")
        elif not problems and not (step_dir / METADATA_NAME).exists():
            return [f"{step_dir}: neither {MANIFEST_NAME} nor {METADATA_NAME}: not a committed checkpoint"]
        elif not problems:
            notes.append(f"{step_dir}: no {MANIFEST_NAME} (not written by cairn): checksums unavailable, "
                         "structure checked only")
            logger.warning(notes[-1])
        if (step_dir / METADATA_NAME).exists():
            from cairn.checkpoint.safe_load import check_dcp_structure

            found = check_dcp_structure(step_dir, manifest_expected=manifest is None and not problems)
            problems.extend(p for p in found if p not in problems)
        return problems

    # retention and cleanup

    def purge(self, keep_latest_k: int, protect: Iterable[int] = ()) -> list[int]:
        """Delete committed steps older than the newest ``keep_latest_k`` (0 keeps all).

        Never the newest committed step, never a step in ``protect`` (being written), never a
        staging dir. Each step is renamed to a trash name first, so it disappears in one
        atomic step; a failing delete is logged and skipped. Safe in a background thread.
        Returns the steps that are no longer visible.
        """
        if keep_latest_k < 0:
            raise ValueError(f"--checkpoint.keep_latest_k must be >= 0, got {keep_latest_k}")
        if keep_latest_k == 0:
            return []
        with self._purge_lock:
            steps = self.committed_steps()
            keep = set(steps[-keep_latest_k:]) | set(protect)
            purged = []
            for step in steps:
                if step in keep:
                    continue
                path = self.step_dir(step)
                trash = self.folder / f"{_TRASH_PREFIX}step-{step}-{uuid.uuid4().hex[:8]}"
                try:
                    os.rename(path, trash)
                    _fsync_dir(self.folder)
                except OSError as e:
                    logger.warning("could not purge checkpoint %s: %s", path, e)
                    continue
                purged.append(step)
                fault_point("during_purge")
                _remove_tree(trash)
            for leftover in self._names(lambda name: name.startswith(_TRASH_PREFIX)):
                _remove_tree(leftover)
        if purged:
            logger.info("purged checkpoints %s (keeping the newest %d)", purged, keep_latest_k)
        return purged

    def cleanup_incomplete(self, protect: Iterable[int] = ()) -> list[Path]:
        """Remove what crashed saves left behind; call at job start on rank 0 only.

        Staging dirs (except those of steps in ``protect``) and trash are deleted; an aside
        copy from an interrupted replace is restored as ``step-N`` if that is missing, else
        deleted. Uncommitted ``step-N`` dirs (a stock DCP save that crashed) are only logged.
        Returns the paths removed.
        """
        protect = set(protect)
        removed: list[Path] = []
        for path in self._names(lambda name: True):
            name = path.name
            if (match := _STAGING_RE.match(name)) and int(match.group(1)) not in protect:
                reason = "staging dir of an unfinished save"
            elif name.startswith(_TRASH_PREFIX):
                reason = "interrupted delete"
            elif match := _ASIDE_RE.match(name):
                final = self.folder / f"step-{match.group(1)}"
                if not final.is_dir() and _has_commit_marker(path):
                    os.rename(path, final)
                    _fsync_dir(self.folder)
                    logger.warning("restored %s from %s (a replace was interrupted)", final, path)
                    continue
                reason = "previous copy of a replaced step"
            elif _STEP_RE.match(name) and path.is_dir() and not _has_commit_marker(path):
                logger.warning("%s has neither %s nor %s: an incomplete save by another tool? It is ignored; "
                               "delete it by hand", path, MANIFEST_NAME, METADATA_NAME)
                continue
            else:
                continue
            gone = _remove_tree(path) if path.is_dir() else _unlink(path)
            if gone:
                logger.warning("removed %s (%s)", path, reason)
                removed.append(path)
        if removed:
            _fsync_dir(self.folder)
        return removed

    def _names(self, keep: Callable[[str], bool]) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(self.folder / name for name in os.listdir(self.folder) if keep(name))


def _unlink(path: Path) -> bool:
    try:
        path.unlink(missing_ok=True)
        return True
    except OSError as e:
        logger.warning("could not delete %s: %s", path, e)
        return False


def check_files(step_dir: Path, manifest: Mapping[str, Any], *, checksums: bool,
                progress: Callable[[int, int], None] | None = None,
                only: Iterable[str] | None = None) -> list[str]:
    """Problems with ``step_dir``'s files against its manifest (sizes; hashes if ``checksums``)."""
    files: dict[str, dict] = manifest.get("files") or {}
    names = sorted(files) if only is None else sorted(set(only) & set(files))
    problems = []
    to_hash = []
    for name in names:
        record = files[name]
        path = step_dir / name
        holds = _holds(record)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path}: missing{holds}")
            continue
        if size != record.get("size"):
            what = "truncated" if size < record.get("size", 0) else "larger than written"
            problems.append(f"{path}: {what}: {size} bytes, manifest says {record.get('size')}{holds}")
        elif checksums and record.get("checksum"):
            to_hash.append((path, record))
    if to_hash:
        total = sum(record["size"] for _, record in to_hash)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        for path, record in to_hash:
            _, checksum = _hash_file(path, advance)
            if checksum != record["checksum"]:
                problems.append(f"{path}: checksum mismatch ({CHECKSUM_ALGORITHM} {checksum}, manifest says "
                                f"{record['checksum']}){_holds(record)}")
    return problems


def _holds(record: Mapping[str, Any]) -> str:
    fqns = record.get("fqns") or []
    if not fqns:
        return ""
    shown = ", ".join(fqns[:6]) + (f" and {len(fqns) - 6} more" if len(fqns) > 6 else "")
    return f" (holds {shown})"
