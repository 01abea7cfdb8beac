"""Reading checkpoints without running code that came from them.

Stock DCP unpickles bytes from the checkpoint in two places: the ``.metadata`` file
(``pickle.load``) and every non-tensor item (``torch.load(weights_only=False)`` in
``DefaultLoadPlanner.load_bytes``). A crafted file runs its payload in either. Here:

- ``.metadata`` goes through an allowlist unpickler that resolves only the classes DCP's
  metadata is made of (its dataclasses, ``torch.Size``, dtypes, layouts, paths); any other
  global is refused before it is imported, so a payload never runs;
- non-tensor items load with ``torch.load(weights_only=True)`` (``SafeLoadPlanner``);
- tensor items already load with ``weights_only=True`` in DCP's FileSystemReader; the tests
  check that on every torch version they run on.

``SafeFileSystemReader`` also checks every file's size against the cairn manifest before
reading (a missing or truncated file is named, rather than failing deep inside a read),
and with ``verify=True`` checks hashes: ``.metadata`` before it is parsed, each data file
before the rank that reads it reads it.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import io
import logging
import os
import pickle
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import Future as _TaskFuture
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint.metadata as metadata_module
import xxhash
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from cairn.checkpoint.storage import (
    CHECKSUM_ALGORITHM,
    MANIFEST_NAME,
    METADATA_NAME,
    SAVE_ID_PREFIX,
    CheckpointError,
    UnsafeCheckpointError,
    _corrupt,
    _holds,
    _parse_manifest,
    check_files,
)

logger = logging.getLogger("cairn")

try:  # private in every torch release so far; the fallback below does the same walk
    from torch.distributed.checkpoint._traverse import set_element
except ImportError:  # pragma: no cover
    def set_element(root: dict, path: Sequence, value: Any) -> None:
        for key in path[:-1]:
            root = root[key]
        root[path[-1]] = value

_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_PATH_CLASSES = frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"})
# module -> names a DCP .metadata may reference. Also admitted (see find_class): any class
# defined in DCP's metadata module (its plain dataclasses and enums, including ones a later
# torch adds) and, from ``torch``, dtypes and layouts by value.
_ALLOWED_GLOBALS: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset"}),
    "copyreg": frozenset({"_reconstructor"}),
    "pathlib": _PATH_CLASSES,
    "pathlib._local": _PATH_CLASSES,  # where Python 3.13+ pickles its paths
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; refuses every global outside ``_ALLOWED_GLOBALS``."""

    def find_class(self, module: str, name: str) -> Any:
        if module == _DCP_METADATA_MODULE:
            value = getattr(metadata_module, name, None)
            if isinstance(value, type) and value.__module__ == _DCP_METADATA_MODULE:
                return value
        elif module == "torch" and name not in _ALLOWED_GLOBALS["torch"]:
            value = getattr(torch, name, None)
            if isinstance(value, (torch.dtype, torch.layout)):
                return value
        elif name in _ALLOWED_GLOBALS.get(module, ()):
            if module == "pathlib._local":
                module = "pathlib"  # a file from Python 3.13+ read on an older Python
            return getattr(importlib.import_module(module), name)
        raise UnsafeCheckpointError(f"it references {module}.{name}, which DCP metadata never contains")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError("it holds a persistent reference, which DCP metadata never contains")


def load_metadata_file(path: str | os.PathLike) -> Metadata:
    """DCP metadata from ``path`` without running code from it; CheckpointError names the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {path.parent} is not a DCP checkpoint, or its save never "
                              "finished") from None
    except UnsafeCheckpointError as e:
        raise UnsafeCheckpointError(f"refusing to load {path}: {e}; the file is crafted or not DCP metadata. "
                                    "Nothing from it was run") from None
    except Exception as e:  # truncated or garbled pickles raise a zoo of types
        raise _corrupt(path.parent, [f"{path}: unreadable DCP metadata ({type(e).__name__}: {e})"]) from None
    problems = _metadata_shape_problems(metadata, path)
    if problems:
        raise _corrupt(path.parent, problems)
    return metadata


def _metadata_shape_problems(metadata: Any, path: Path) -> list[str]:
    if not isinstance(metadata, Metadata):
        return [f"{path}: holds a {type(metadata).__name__}, not DCP Metadata"]
    if not isinstance(metadata.state_dict_metadata, dict) or not isinstance(metadata.storage_data, dict):
        return [f"{path}: DCP metadata without its state_dict_metadata/storage_data tables"]
    problems = []
    for index, info in metadata.storage_data.items():
        relative_path = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        # A crafted entry could point outside the checkpoint (``../../etc/passwd``).
        if (not isinstance(relative_path, str) or not relative_path or "/" in relative_path
                or "\\" in relative_path or relative_path in (".", "..")):
            problems.append(f"{path}: item {getattr(index, 'fqn', index)!r} points to an invalid file name "
                            f"{relative_path!r}")
        elif not (isinstance(offset, int) and isinstance(length, int) and offset >= 0 and length >= 0):
            problems.append(f"{path}: item {index.fqn!r} has an invalid offset/length ({offset}, {length})")
    return problems


def written_by_cairn(metadata: Metadata) -> bool:
    save_id = getattr(getattr(metadata, "storage_meta", None), "save_id", None)
    return isinstance(save_id, str) and save_id.startswith(SAVE_ID_PREFIX)


def check_dcp_structure(step_dir: str | os.PathLike, manifest_expected: bool = False) -> list[str]:
    """Problems in a DCP dir's structure: unsafe/unreadable ``.metadata``, items outside their files.

    ``manifest_expected``: the dir has no manifest; report that if cairn wrote the metadata.
    """
    step_dir = Path(step_dir)
    try:
        metadata = load_metadata_file(step_dir / METADATA_NAME)
    except CheckpointError as e:
        return list(getattr(e, "problems", None) or [str(e)])
    problems = []
    if manifest_expected and written_by_cairn(metadata):
        problems.append(f"{step_dir / MANIFEST_NAME}: missing (cairn wrote this step, with a manifest)")
    sizes: dict[str, int | None] = {}
    for index, info in metadata.storage_data.items():
        name = info.relative_path
        if name not in sizes:
            try:
                sizes[name] = (step_dir / name).stat().st_size
            except FileNotFoundError:
                sizes[name] = None
                problems.append(f"{step_dir / name}: missing (DCP metadata points to it)")
        if sizes[name] is not None and info.offset + info.length > sizes[name]:
            problems.append(f"{step_dir / name}: item {index.fqn!r} ends at byte {info.offset + info.length}, "
                            f"past the end of the file ({sizes[name]} bytes)")
    for fqn, item in metadata.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            indexes = [MetadataIndex(fqn, chunk.offsets) for chunk in item.chunks]
        elif isinstance(item, BytesStorageMetadata):
            indexes = [MetadataIndex(fqn)]
        else:
            continue
        if any(index not in metadata.storage_data for index in indexes):
            problems.append(f"{step_dir / METADATA_NAME}: {fqn!r} has no stored data")
    return problems


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader that never unpickles code and checks files against the manifest."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        super().__init__(path)
        self.verify = verify
        self.last_error: CheckpointError | None = None
        self._manifest: dict | None = None
        self._manifest_checked = False
        self._verified: set[str] = set()
        # Seconds the reads waited, once done, for the hashing thread (verify): what it added to them.
        self.hash_wait_s = 0.0

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        super().reset(checkpoint_id)
        if checkpoint_id:
            self._manifest, self._manifest_checked, self._verified = None, False, set()

    def _check_manifest(self) -> None:
        if self._manifest_checked:
            return
        step_dir = Path(self.path)
        try:
            raw = (step_dir / MANIFEST_NAME).read_bytes()
        except FileNotFoundError:
            raw = None
        if raw is None and self.verify:
            logger.warning("%s has no %s (not written by cairn): checksums cannot be verified", step_dir,
                           MANIFEST_NAME)
        if raw is not None:
            manifest = _parse_manifest(raw, step_dir / MANIFEST_NAME)
            problems = check_files(step_dir, manifest, checksums=False)
            if not problems and self.verify:
                problems = check_files(step_dir, manifest, checksums=True, only=[METADATA_NAME])
                self._verified.add(METADATA_NAME)
            if problems:
                raise _corrupt(step_dir, problems)
            self._manifest = manifest
        self._manifest_checked = True

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if rank is not None and self.last_error is not None:
            raise self.last_error  # DCP's per-rank fallback after our refusal: same answer
        try:
            self._check_manifest()
            metadata = load_metadata_file(self._get_metadata_path(rank))
            if self._manifest is None and written_by_cairn(metadata):
                raise _corrupt(Path(self.path), [f"{Path(self.path) / MANIFEST_NAME}: missing (cairn wrote this "
                                                 "step, with a manifest)"])
        except CheckpointError as e:
            self.last_error = e
            raise
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        try:
            if self.verify and self._manifest is not None:
                return self._read_verified(plan, planner)
            return self._read(plan, planner)
        except CheckpointError as e:
            self.last_error = e
            raise
        except pickle.UnpicklingError as e:  # a tensor item that is not a plain tensor
            error = UnsafeCheckpointError(f"refusing to load a tensor item from {self.path}: "
                                          f"{str(e).splitlines()[0]}")
            self.last_error = error
            raise error from None


    def _read_verified(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Hash the files this rank reads while it reads them: one pass over a cold disk, not two.

        A file this rank reads whole is hashed by the read-ahead thread from the bytes it reads
        anyway; any other file (read in part, as when resharding) by a thread of its own, in
        parallel. A mismatch is raised once both are done, naming the file (in preference to
        whatever error the damaged bytes caused in the read); nothing loaded is used before that.
        """
        files = self._manifest["files"]
        ranges: dict[str, list[tuple[int, int]]] = {}
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            ranges.setdefault(info.relative_path, []).append((info.offset, info.length))
        names = set(ranges) - self._verified
        whole = {name for name in names if name in files and _tiles(ranges[name], files[name].get("size"))}
        digests: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cairn-verify") as pool:
            rest = sorted(names - whole)
            hashing = pool.submit(check_files, Path(self.path), self._manifest, checksums=True, only=rest) if rest \
                else None
            read_error = None
            try:
                future = self._read(plan, planner, hash_files=whole, digests=digests)
                future.wait()
            except BaseException as e:  # judged after the hashes: corruption explains it best
                read_error = e
            problems = hashing.result() if hashing is not None else []
        unfinished = sorted(whole - set(digests))  # the read stopped before these were hashed
        if unfinished:
            problems += check_files(Path(self.path), self._manifest, checksums=True, only=unfinished)
        for name, checksum in sorted(digests.items()):
            record = files[name]
            if record.get("checksum") and checksum != record["checksum"]:
                problems.append(f"{Path(self.path) / name}: checksum mismatch ({CHECKSUM_ALGORITHM} {checksum}, "
                                f"manifest says {record['checksum']}){_holds(record)}")
        if problems:
            raise _corrupt(Path(self.path), problems) from read_error
        if read_error is not None:
            raise read_error
        self._verified |= names
        return future

    def _read(self, plan: LoadPlan, planner: LoadPlanner, *, hash_files: Iterable[str] = (),
              digests: dict[str, str] | None = None) -> Future[None]:
        """DCP's read, with the disk kept busy: a thread reads the items' bytes into the page
        cache in file order, up to ``READ_AHEAD_BYTES`` ahead, while ``PLACE_THREADS`` threads
        deserialize them (tensors with ``weights_only=True``, as DCP does) and copy them into
        place (non-tensor items on this thread, which owns the state dict's structure).
        Each stored item is deserialized once, however many requests it serves. The files in
        ``hash_files`` (read whole) are hashed on the way, into ``digests``."""
        infos = {item.storage_index: self.storage_data[item.storage_index] for item in plan.items}
        if any(getattr(info, "transform_descriptors", None) for info in infos.values()):
            return super().read_data(plan, planner)  # stream transforms (extensions): DCP's own path
        by_key: dict[tuple[str, int, int], list[ReadItem]] = {}
        for item in plan.items:
            info = infos[item.storage_index]
            by_key.setdefault((info.relative_path, info.offset, info.length), []).append(item)
        order = sorted(by_key)  # by file, then offset: one sequential pass per file
        folder = Path(self.path)
        prefetch = _Prefetch(folder, order, READ_AHEAD_BYTES, hash_files)
        handles: dict[str, int] = {}
        pending: list[_TaskFuture] = []
        slots = threading.Semaphore(2 * PLACE_THREADS)
        pool = ThreadPoolExecutor(max_workers=PLACE_THREADS, thread_name_prefix="cairn-load")

        def place(index: int, items: list[ReadItem], stored: _FileSlice) -> None:
            try:
                _place(planner, items, stored)
            finally:
                prefetch.consumed(index)
                slots.release()

        try:
            for index, key in enumerate(order):
                path, offset, length = key
                prefetch.wait_for(index)
                if path not in handles:
                    handles[path] = os.open(folder / path, os.O_RDONLY)
                stored = _FileSlice(handles[path], offset, length, folder / path)
                slots.acquire()
                if by_key[key][0].type == LoadItemType.BYTE_IO:  # sets into the state dict: this thread only
                    place(index, by_key[key], stored)
                    continue
                if any(f.done() and f.exception() for f in pending):
                    slots.release()
                    break
                pending.append(pool.submit(place, index, by_key[key], stored))
            for f in pending:
                f.result()  # the first error, in file order
        finally:
            pool.shutdown(wait=True)
            for handle in handles.values():
                os.close(handle)
            prefetch.close()
            self.hash_wait_s += prefetch.hash_wait_s
            if digests is not None:
                digests.update(prefetch.digests)
        future: Future[None] = Future()
        future.set_result(None)
        return future


READ_AHEAD_BYTES = 1 << 30
# Threads deserializing and placing tensors (torch.load's copy out of the page cache and the
# copy into the target, a host-to-device one on GPUs, both release the GIL): one alone could
# not keep up with the disk on the H100 host of benchmarks/RESULTS.md.
PLACE_THREADS = 4
_READ_CHUNK = 8 << 20  # kernel readahead keeps up with reads of this size; much larger ones measured slower


class _Prefetch:
    """A thread that reads ``keys`` = (file, offset, length), in order, into the page cache (a
    reused scratch buffer, no allocation), at most ``budget`` bytes ahead of the consumer.

    The files in ``hash_files`` (read whole) are hashed by a second thread that follows the
    first through each file, reading from the page cache into a buffer of its own
    (``digests``: the files it finished). Both buffers are small on purpose: copies into a
    buffer that outgrows the CPU's caches and TLB ran about five times slower on the dev VM
    (benchmarks/copy_probe.py). On the 1B benchmark of benchmarks/RESULTS.md, handing the read
    bytes to a hashing pool instead cost a cold load 4-5% (every handoff waits for the GIL,
    which the placing threads hold often), and hashing them on the reading thread 9%: the
    reads stall while it hashes.
    """

    def __init__(self, folder: Path, keys: Sequence[tuple[str, int, int]], budget: int,
                 hash_files: Iterable[str] = ()):
        self._keys = list(keys)
        hash_files = set(hash_files)
        self._hash_order = [path for path in dict.fromkeys(key[0] for key in self._keys) if path in hash_files]
        self.digests: dict[str, str] = {}
        # Seconds ``close`` waited for the hashing thread once the reads were done: what verifying
        # added to the load.
        self.hash_wait_s = 0.0
        self._budget = budget
        self._done = -1  # index of the last key fully read (len(keys) once the thread stopped)
        self._complete = False  # every key was read
        self._read_to: dict[str, int] = {}  # file -> offset up to which its bytes were read (verifying)
        self._consumed = -1
        self._ahead = 0  # bytes read and not yet consumed
        self._closed = False
        lock = threading.Lock()
        self._cond = threading.Condition(lock)
        # The hashing thread's own wake-ups (each chunk read), on the same lock, so the
        # consumer is woken only when a whole key is read.
        self._progress = threading.Condition(lock) if self._hash_order else None
        self._folder = folder
        self._thread = threading.Thread(target=self._run, name="cairn-prefetch", daemon=True)
        self._thread.start()
        self._hasher = None
        if self._hash_order:
            self._hasher = threading.Thread(target=self._hash_run, name="cairn-verify", daemon=True)
            self._hasher.start()

    def _run(self) -> None:
        scratch = memoryview(bytearray(_READ_CHUNK))
        handle, name = None, None
        try:
            for index, (path, offset, length) in enumerate(self._keys):
                with self._cond:
                    self._cond.wait_for(lambda: self._closed or self._ahead == 0
                                        or self._ahead + length <= self._budget)
                    if self._closed:
                        return
                if path != name:
                    if handle is not None:
                        os.close(handle)
                    handle, name = os.open(self._folder / path, os.O_RDONLY), path
                got = 0
                while got < length:  # preadv releases the GIL; a short file ends early (the reader names it)
                    n = os.preadv(handle, [scratch[:min(_READ_CHUNK, length - got)]], offset + got)
                    if n == 0:
                        break
                    got += n
                    if self._progress is not None:  # the hasher follows chunk by chunk, not key by key
                        with self._progress:
                            self._read_to[path] = offset + got
                            self._progress.notify()
                with self._cond:
                    self._ahead += length
                    self._done = index
                    self._cond.notify_all()
            self._complete = True
        except OSError:
            pass  # the reader meets the same error itself, with its own message
        finally:
            if handle is not None:
                os.close(handle)
            with self._cond:
                self._done = len(self._keys)
                self._cond.notify_all()
                if self._progress is not None:
                    self._progress.notify()

    def _hash_run(self) -> None:
        """Hash each file of ``hash_files`` in order, never ahead of the reading thread (so the
        disk sees one sequential pass), to its end once every key was read. A read that stopped
        early (an error, or ``close`` before the end) stops it too: the reader judges the rest."""
        scratch = memoryview(bytearray(_READ_CHUNK))
        for path in self._hash_order:
            digest, pos = xxhash.xxh3_128(), 0
            try:
                handle = os.open(self._folder / path, os.O_RDONLY)
            except OSError:
                return
            try:
                size = os.fstat(handle).st_size
                while True:
                    with self._progress:
                        self._progress.wait_for(lambda: self._read_to.get(path, 0) >= min(pos + _READ_CHUNK, size)
                                                or self._done == len(self._keys))
                        if self._done == len(self._keys) and not self._complete:
                            return
                    n = os.preadv(handle, [scratch], pos)  # releases the GIL, as the hash does
                    if n == 0:
                        break
                    digest.update(scratch[:n])
                    pos += n
            except OSError:
                return
            finally:
                os.close(handle)
            self.digests[path] = digest.hexdigest()

    def wait_for(self, index: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self._done >= index)

    def consumed(self, index: int) -> None:
        with self._cond:
            self._ahead -= self._keys[index][2]
            self._consumed = index
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        if self._hasher is not None:
            start = time.perf_counter()
            self._hasher.join()
            self.hash_wait_s = time.perf_counter() - start


class _FileSlice(io.RawIOBase):
    """Bytes ``offset .. offset + length`` of a file (an fd, read with pread: threads may share
    it), as a seekable file of their own."""

    def __init__(self, fd: int, offset: int, length: int, path: Path):
        super().__init__()
        self._fd, self._start, self._length, self._path = fd, offset, length, path
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, out) -> int:
        view = memoryview(out).cast("B")
        want = max(0, min(len(view), self._length - self._pos))
        got = 0
        while got < want:  # preadv releases the GIL
            n = os.preadv(self._fd, [view[got:want]], self._start + self._pos + got)
            if not n:
                raise CheckpointError(f"{self._path}: ends at byte {self._start + self._pos + got}, but the checkpoint "
                                      f"metadata places an item at bytes {self._start}..{self._start + self._length}")
            got += n
        self._pos += got
        return got

    def read(self, size: int = -1) -> bytes:
        want = self._length - self._pos if size is None or size < 0 else min(size, self._length - self._pos)
        out = bytearray(max(0, want))
        self.readinto(out)
        return bytes(out)


def _tiles(ranges: list[tuple[int, int]], size: int | None) -> bool:
    """Whether (offset, length) ranges cover bytes 0..size exactly, each once."""
    end = 0
    for offset, length in sorted(set(ranges)):
        if offset != end:
            return False
        end = offset + length
    return size is not None and end == size


class _TensorRecordUnpickler(pickle.Unpickler):
    """Reads a tensor record's ``data.pkl`` into (storage dtype, storage numel, offset, size,
    stride) without touching its storage bytes. Admits only what ``torch.save`` of a plain
    tensor writes; anything else raises, and the record goes through ``torch.load`` instead."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _tensor_layout
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage") and name in _TYPED_STORAGES:
            return _TYPED_STORAGES[name]
        raise pickle.UnpicklingError(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError("not a typed storage reference")
        _, dtype, key, _location, numel = pid
        return ("storage", dtype, str(key), int(numel))


def _typed_storages() -> dict[str, torch.dtype]:
    """torch.save names a storage by its legacy typed-storage class (torch.FloatStorage, ...)."""
    import warnings

    out = {}
    for name in dir(torch):
        if not name.endswith("Storage") or name in ("Storage", "TypedStorage", "UntypedStorage"):
            continue
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage's deprecation notice
            dtype = getattr(torch, name).dtype
            if isinstance(dtype, torch.dtype) and not dtype.is_complex and not str(dtype).startswith("torch.q"):
                out[name] = dtype
    return out


_TYPED_STORAGES = _typed_storages()


def _tensor_layout(storage, offset, size, stride, requires_grad=False, hooks=None, *_):
    return ("tensor", storage, int(offset), tuple(size), tuple(stride))


_LOCAL_HEADER = 30  # bytes of a zip local file header before its name and extra field


def zip_local_header(f, info) -> tuple[bytes, int]:
    """(the fixed part of ``info``'s local file header, where the entry's bytes start) in the
    zip archive ``f`` (a seekable binary file); BadZipFile if no local header is there."""
    import zipfile

    f.seek(info.header_offset)
    header = f.read(_LOCAL_HEADER)
    if len(header) != _LOCAL_HEADER or header[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"no local file header for {info.filename} at byte {info.header_offset}")
    name_length, extra_length = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    return header, info.header_offset + _LOCAL_HEADER + name_length + extra_length


_READ_INTO_CHUNK = 32 << 20
_bounce = threading.local()  # per placing thread: a reused host buffer for device targets


def _raw_tensor_bytes(stored: _FileSlice) -> tuple[torch.dtype, tuple[int, ...], int, int] | None:
    """(dtype, shape, offset, length) of a ``torch.save``d tensor's bytes inside ``stored``,
    when the record holds one contiguous tensor that is its whole storage, stored
    uncompressed, little-endian; None for anything else (``torch.load`` reads those)."""
    import zipfile

    def entry(info: zipfile.ZipInfo) -> tuple[int, int] | None:
        """(start, length) of an uncompressed entry's bytes, from its local header. Not
        ``ZipFile.read``: cairn writes these records without CRC32s (see storage._zip_crc32_off)."""
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        try:
            return zip_local_header(stored, info)[1], info.file_size
        except zipfile.BadZipFile:
            return None

    def read(info: zipfile.ZipInfo) -> bytes | None:
        where = entry(info)
        if where is None or where[1] > (1 << 20):
            return None
        stored.seek(where[0])
        return stored.read(where[1])

    try:
        with zipfile.ZipFile(stored) as archive:
            infos = archive.infolist()
        pickles = [i for i in infos if i.filename.endswith("/data.pkl")]
        storages = [i for i in infos if i.filename.split("/")[-2:-1] == ["data"]]
        orders = [i for i in infos if i.filename.endswith("/byteorder")]
        if len(pickles) != 1 or len(storages) != 1 or len(orders) > 1:
            return None
        if orders and read(orders[0]) != b"little":
            return None
        data_pkl = read(pickles[0])
        if data_pkl is None:
            return None
        layout = _TensorRecordUnpickler(io.BytesIO(data_pkl)).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, ValueError, TypeError, EOFError, KeyError,
            AttributeError, IndexError):
        return None
    info = storages[0]
    if not (isinstance(layout, tuple) and len(layout) == 5 and layout[0] == "tensor"):
        return None
    _, (_, dtype, key, numel), offset, size, stride = layout
    expected_stride, running = [], 1
    for dim in reversed(size):
        expected_stride.append(running)
        running *= dim
    if (info.filename.rsplit("/", 1)[-1] != key or offset != 0 or numel != running
            or tuple(reversed(expected_stride)) != stride or info.file_size != numel * dtype.itemsize):
        return None
    where = entry(info)
    if where is None or where[0] + where[1] > stored._length:
        return None
    return dtype, size, where[0], where[1]


def _read_into(stored: _FileSlice, target: torch.Tensor, start: int, length: int, *,
               direct: bool | None = None) -> None:
    """The bytes ``start .. start + length`` of ``stored`` into the contiguous ``target``:
    straight into its memory on the host (``direct``), else through a reused host buffer in
    pieces of ``_READ_INTO_CHUNK`` bytes (a device target)."""
    flat = target.reshape(-1).view(torch.uint8)
    if direct is None:
        direct = target.device.type == "cpu"
    if direct:
        stored.seek(start)
        view = memoryview(flat.numpy())
        got = stored.readinto(view)
        if got != length:
            raise CheckpointError(f"{stored._path}: {got} of {length} bytes of a tensor record")
        return
    buffer = getattr(_bounce, "buffer", None)
    if buffer is None:
        buffer = _bounce.buffer = torch.empty(_READ_INTO_CHUNK, dtype=torch.uint8)
    done = 0
    while done < length:
        n = min(_READ_INTO_CHUNK, length - done)
        stored.seek(start + done)
        if stored.readinto(memoryview(buffer.numpy())[:n]) != n:
            raise CheckpointError(f"{stored._path}: a tensor record ends early")
        flat[done:done + n].copy_(buffer[:n])  # synchronous: the buffer is reused next
        done += n


def _place_raw(planner: LoadPlanner, items: list[ReadItem], stored: _FileSlice) -> bool:
    """The common case without deserializing: one read item taking a whole stored tensor into a
    contiguous target of its dtype and shape. False (nothing done) for any other case."""
    if len(items) != 1:
        return False
    item = items[0]
    if any(start != 0 for start in item.storage_offsets):
        return False
    raw = _raw_tensor_bytes(stored)
    if raw is None:
        return False
    dtype, shape, start, length = raw
    if tuple(item.lengths) != shape:
        return False
    target = planner.resolve_tensor(item).detach()
    if (target.layout != torch.strided or target.device.type == "meta" or target.dtype != dtype
            or tuple(target.shape) != shape or not target.is_contiguous()):
        return False
    if length:
        _read_into(stored, target, start, length)
    planner.commit_tensor(item, target)
    return True


def _place(planner: LoadPlanner, items: list[ReadItem], stored: _FileSlice) -> None:
    """The read items that one stored item serves, from its bytes, as DCP's FileSystemReader
    places them (but read and deserialized once for all of them). A whole stored tensor
    going into a target that matches it is read straight into the target (``_place_raw``)."""
    if items[0].type == LoadItemType.BYTE_IO:
        data = stored.read()
        for item in items:
            planner.load_bytes(item, io.BytesIO(data))
        return
    if _place_raw(planner, items, stored):
        return
    stored.seek(0)
    whole = torch.load(stored, map_location="cpu", weights_only=True)
    if not isinstance(whole, torch.Tensor):
        raise UnsafeCheckpointError(f"tensor item {items[0].storage_index.fqn!r} holds a {type(whole).__name__}, "
                                    "not a tensor")
    for item in items:
        tensor = whole
        for dim, (start, length) in enumerate(zip(item.storage_offsets, item.lengths)):
            if start != 0 or length != tensor.size(dim):
                tensor = tensor.narrow(dim, start, length)
        target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise CheckpointError(f"{item.storage_index.fqn}: the checkpoint holds a {tuple(tensor.size())} piece "
                                  f"where the model expects {tuple(target.size())}")
        target.copy_(tensor)
        planner.commit_tensor(item, target)


def _where(planner: DefaultLoadPlanner, read_item: ReadItem) -> str:
    info = (getattr(planner.metadata, "storage_data", None) or {}).get(read_item.storage_index)
    name = getattr(info, "relative_path", "?")
    return f"{name} (item {read_item.storage_index.fqn!r})"


class _WeightsOnlyObjects:
    """``load_bytes`` with ``torch.load(weights_only=True)``, for DefaultLoadPlanner subclasses."""

    safe_globals: tuple = ()

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        allow = torch.serialization.safe_globals(list(self.safe_globals)) if self.safe_globals else (
            contextlib.nullcontext())
        try:
            with allow:
                obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"refusing to unpickle {_where(self, read_item)}: {str(e).splitlines()[0]} Loading never runs "
                "code from checkpoint files: save such values as plain Python types, or allow the class with "
                "load_planner(safe_globals=[...])") from None
        except Exception as e:
            raise CheckpointError(f"cannot read {_where(self, read_item)}: {type(e).__name__}: {e}") from None
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class SafeLoadPlanner(_WeightsOnlyObjects, DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor items load with ``torch.load(weights_only=True)``.

    ``safe_globals`` admits extra classes (as ``torch.serialization.safe_globals`` does);
    other options go to DefaultLoadPlanner (``allow_partial_load``, ...).
    """

    def __init__(self, *args: Any, safe_globals: Iterable = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.safe_globals = tuple(safe_globals)


try:
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
except ImportError:  # pragma: no cover
    _EmptyStateDictLoadPlanner = None

if _EmptyStateDictLoadPlanner is not None:
    class SafeEmptyStateDictLoadPlanner(_WeightsOnlyObjects, _EmptyStateDictLoadPlanner):
        """Rebuilds the whole saved state dict from metadata (as ``dcp_to_torch`` does), safely."""

        def __init__(self, keys: Iterable[str] | None = None, *, safe_globals: Iterable = (), **kwargs: Any):
            super().__init__(keys=set(keys) if keys is not None else None, **kwargs)
            self.safe_globals = tuple(safe_globals)


def load_full_state_dict(step_dir: str | os.PathLike, *, keys: Iterable[str] | None = None,
                         verify: bool = False) -> dict[str, Any]:
    """Everything (or ``keys``) saved in a DCP dir, in this process, without running checkpoint code."""
    if _EmptyStateDictLoadPlanner is None:  # pragma: no cover
        raise CheckpointError("this torch has no _EmptyStateDictLoadPlanner; cannot rebuild a state dict "
                              "without a template")
    import torch.distributed.checkpoint as dcp

    from cairn.checkpoint.storage import find_checkpoint_error

    reader = SafeFileSystemReader(step_dir, verify=verify)
    planner = SafeEmptyStateDictLoadPlanner(keys)
    try:
        dcp.load({}, storage_reader=reader, planner=planner, no_dist=True)
    except BaseException as e:
        error = reader.last_error or find_checkpoint_error(e)
        if error is not None and error is not e:
            raise error from e
        raise
    return planner.original_state_dict  # the dict the planner rebuilt from the metadata and filled
