"""Reading a step into a state dict without running code from it, checked before it is trusted.

Stock DCP unpickles bytes from the checkpoint in two places: the ``.metadata`` file and every
non-tensor item (``torch.load(weights_only=False)`` in ``DefaultLoadPlanner.load_bytes``). A
crafted file runs its payload in either. Here:

- ``.metadata`` goes through the allowlist unpickler of ``dcp_metadata``;
- non-tensor items load with ``torch.load(weights_only=True)`` (``SafeLoadPlanner``);
- tensor items are read straight into their targets when the record is a plain tensor, else
  with ``torch.load(weights_only=True)``.

``SafeFileSystemReader`` also checks, before it reads a byte of data: the manifest (its
checksum, that it belongs to this step folder and to the save whose metadata it is with),
every file's size against the manifest, and every item's offset and length against the real
file; it opens only regular files, never following a link. With ``verify=True`` it checks
hashes: ``.metadata`` before it is parsed, each data file while the rank that reads it reads it.
"""

from __future__ import annotations

import abc
import contextlib
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
import xxhash
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from cairn.checkpoint.dcp_metadata import load_metadata_file, out_of_bounds, save_id_of, written_by_cairn
from cairn.checkpoint.errors import CheckpointError, UnsafeCheckpointError, corrupt_error, reraise_user_error
from cairn.checkpoint.fsio import NotRegularFileError, open_regular, regular_file_stat
from cairn.checkpoint.layout import MANIFEST_NAME, METADATA_NAME
from cairn.checkpoint.manifest import (
    CHECKSUM_ALGORITHM,
    check_files,
    check_identity,
    folder_step,
    holds,
    read_manifest,
)
from cairn.checkpoint.torchzip import raw_tensor_bytes, record_sizes_fit

logger = logging.getLogger("cairn")

try:  # private in every torch release so far; the fallback below does the same walk
    from torch.distributed.checkpoint._traverse import set_element
except ImportError:  # pragma: no cover
    def set_element(root: dict, path: Sequence, value: Any) -> None:
        for key in path[:-1]:
            root = root[key]
        root[path[-1]] = value


def weights_only_refusal(error: BaseException) -> str:
    """What ``torch.load(weights_only=True)`` refused, without torch's advice to load unsafely."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line or "global" in line.lower():
            return line.rstrip(".")
    return "it holds something other than tensors and plain Python values"


def accept_metadata(metadata: Metadata, manifest: dict | None, where, manifest_path, load_id: str) -> Metadata:
    """What every reader checks of a step's DCP metadata: written by the save its manifest
    records (or, with no manifest, not written by cairn, which always writes one); then DCP's
    load id on it."""
    if manifest is None:
        if written_by_cairn(metadata):
            raise corrupt_error(where, [f"{manifest_path}: missing (cairn wrote this step, with a manifest)"])
    else:
        problems = check_identity(manifest, None, manifest_path, save_id_of(metadata))
        if problems:
            raise corrupt_error(where, problems)
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = load_id
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's FileSystemReader that never unpickles code and checks files before it reads them."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        super().__init__(path)
        self.verify = verify
        self.last_error: CheckpointError | None = None
        self._manifest: dict | None = None
        self._manifest_checked = False
        self._verified: set[str] = set()
        self._bounds_checked = False
        # Seconds the reads waited, once done, for the hashing thread (verify): what it added to them.
        self.hash_wait_s = 0.0

    @property
    def manifest(self) -> dict | None:
        return self._manifest

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        super().reset(checkpoint_id)
        if checkpoint_id:
            self._manifest, self._manifest_checked, self._verified = None, False, set()
            self._bounds_checked = False

    def _check_manifest(self) -> None:
        if self._manifest_checked:
            return
        step_dir = Path(self.path)
        manifest = read_manifest(step_dir)
        if manifest is None and self.verify:
            logger.warning("%s has no %s (not written by cairn): checksums cannot be verified", step_dir,
                           MANIFEST_NAME)
        if manifest is not None:
            problems = check_identity(manifest, folder_step(step_dir), step_dir / MANIFEST_NAME)
            problems += check_files(step_dir, manifest, checksums=False)
            if not problems and self.verify:
                problems = check_files(step_dir, manifest, checksums=True, only=[METADATA_NAME])
                self._verified.add(METADATA_NAME)
            if problems:
                raise corrupt_error(step_dir, problems)
            self._manifest = manifest
        self._manifest_checked = True

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if rank is not None and self.last_error is not None:
            raise self.last_error  # DCP's per-rank fallback after our refusal: same answer
        try:
            self._check_manifest()
            step_dir = Path(self.path)
            return accept_metadata(load_metadata_file(self._get_metadata_path(rank)), self._manifest, step_dir,
                                   step_dir / MANIFEST_NAME, self.load_id)
        except CheckpointError as e:
            self.last_error = e
            raise

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        try:
            self._check_bounds(plan)
            if self.verify and self._manifest is not None:
                return self._read_verified(plan, planner)
            return self._read(plan, planner)
        except CheckpointError as e:
            self.last_error = e
            raise
        except pickle.UnpicklingError as e:  # a tensor item that is not a plain tensor
            error = UnsafeCheckpointError(f"refusing to load a tensor item from {self.path}: "
                                          f"{weights_only_refusal(e)}; nothing from it was run")
            self.last_error = error
            raise error from None

    def _check_bounds(self, plan: LoadPlan) -> None:
        """Every item this rank reads lies inside a regular file of the step: checked against
        the real files before any byte is read or any buffer allocated for it."""
        step_dir = Path(self.path)
        sizes: dict[str, int] = {}
        problems: list[str] = []
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            name = info.relative_path
            if name not in sizes:
                try:
                    sizes[name] = regular_file_stat(step_dir / name).st_size
                except FileNotFoundError:
                    sizes[name] = -1
                    problems.append(f"{step_dir / name}: missing (DCP metadata points to it)")
                except NotRegularFileError as e:
                    sizes[name] = -1
                    problems.append(str(e))
            if sizes[name] >= 0:
                problem = out_of_bounds(name, item.storage_index.fqn, info.offset, info.length, sizes[name],
                                        step_dir / name)
                if problem is not None:
                    problems.append(problem)
        if problems:
            raise corrupt_error(step_dir, list(dict.fromkeys(problems)))

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
        whole = {name for name in names if name in files and tiles(ranges[name], files[name].get("size"))}
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
                                f"manifest says {record['checksum']}){holds(record)}")
        unlisted = sorted(name for name in names if name not in files)
        problems += [f"{Path(self.path) / name}: not in the manifest, so it cannot be verified" for name in unlisted]
        if problems:
            raise corrupt_error(Path(self.path), problems) from read_error
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

        def place(index: int, items: list[ReadItem], stored: FileSlice) -> None:
            try:
                place_items(planner, items, stored)
            finally:
                prefetch.consumed(index)
                slots.release()

        try:
            for index, key in enumerate(order):
                path, offset, length = key
                prefetch.wait_for(index)
                if path not in handles:
                    handles[path] = open_regular(folder / path)
                stored = FileSlice(handles[path], offset, length, folder / path)
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


class CachedMetadataReader(SafeFileSystemReader):
    """A ``SafeFileSystemReader`` that reads (and checks) ``.metadata`` once, for the many
    single-key loads of one command or conversion."""

    def __init__(self, path: str | os.PathLike, *, verify: bool = False):
        super().__init__(path, verify=verify)
        self.metadata: Metadata | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self.metadata is None:
            self.metadata = super().read_metadata(*args, **kwargs)
        return self.metadata


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
                    handle, name = open_regular(self._folder / path), path
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
        except (OSError, CheckpointError):
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
                handle = open_regular(self._folder / path)
            except (OSError, CheckpointError):
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


class StoredItem(io.RawIOBase):
    """The bytes of one stored item (``length`` of them, from ``path``), as a seekable file of
    their own. Subclasses implement ``_pread(view, position)``."""

    def __init__(self, length: int, path: str | os.PathLike):
        super().__init__()
        self.length, self.path = length, path
        self._pos = 0

    @abc.abstractmethod
    def _pread(self, view: memoryview, position: int) -> int:
        """Read into ``view`` from byte ``position`` of the item; the count read (0 at its end)."""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.length}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, out) -> int:
        view = memoryview(out).cast("B")
        want = max(0, min(len(view), self.length - self._pos))
        got = 0
        while got < want:
            n = self._pread(view[got:want], self._pos + got)
            if not n:
                raise CheckpointError(f"{self.path}: ends within an item that the checkpoint metadata places "
                                      f"there ({self.length} bytes)")
            got += n
        self._pos += got
        return got

    def read(self, size: int = -1) -> bytes:
        want = self.length - self._pos if size is None or size < 0 else min(size, self.length - self._pos)
        out = bytearray(max(0, want))
        self.readinto(out)
        return bytes(out)


class FileSlice(StoredItem):
    """Bytes ``offset .. offset + length`` of a file (an fd, read with pread: threads may share it)."""

    def __init__(self, fd: int, offset: int, length: int, path: Path):
        super().__init__(length, path)
        self._fd, self._start = fd, offset

    def _pread(self, view: memoryview, position: int) -> int:
        return os.preadv(self._fd, [view], self._start + position)  # releases the GIL


class BytesSlice(StoredItem):
    """Bytes ``offset .. offset + length`` of a buffer in memory (an object read from a store)."""

    def __init__(self, buffer, offset: int, length: int, path: str):
        super().__init__(length, path)
        self._buffer, self._start = memoryview(buffer).cast("B"), offset

    def _pread(self, view: memoryview, position: int) -> int:
        start = self._start + position
        n = max(0, min(len(view), len(self._buffer) - start))
        view[:n] = self._buffer[start:start + n]
        return n


def tiles(ranges: list[tuple[int, int]], size: int | None) -> bool:
    """Whether (offset, length) ranges cover bytes 0..size exactly, each once."""
    end = 0
    for offset, length in sorted(set(ranges)):
        if offset != end:
            return False
        end = offset + length
    return size is not None and end == size


_READ_INTO_CHUNK = 32 << 20
# Whether whole stored tensors are read straight into their targets (the raw path); False sends
# every tensor through torch.load (benchmarks/storage_bench.py measures both).
RAW_PLACEMENT = True
_bounce = threading.local()  # per placing thread: a reused host buffer for device targets


def _read_into(stored: StoredItem, target: torch.Tensor, start: int, length: int, *,
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
            raise CheckpointError(f"{stored.path}: {got} of {length} bytes of a tensor record")
        return
    buffer = getattr(_bounce, "buffer", None)
    if buffer is None:
        buffer = _bounce.buffer = torch.empty(_READ_INTO_CHUNK, dtype=torch.uint8)
    done = 0
    while done < length:
        n = min(_READ_INTO_CHUNK, length - done)
        stored.seek(start + done)
        if stored.readinto(memoryview(buffer.numpy())[:n]) != n:
            raise CheckpointError(f"{stored.path}: a tensor record ends early")
        flat[done:done + n].copy_(buffer[:n])  # synchronous: the buffer is reused next
        done += n


def _place_raw(planner: LoadPlanner, items: list[ReadItem], stored: StoredItem) -> bool:
    """The common case without deserializing: one read item taking a whole stored tensor into a
    contiguous target of its dtype and shape. False (nothing done) for any other case."""
    if len(items) != 1 or not RAW_PLACEMENT:
        return False
    item = items[0]
    if any(start != 0 for start in item.storage_offsets):
        return False
    raw = raw_tensor_bytes(stored, stored.length)
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


def _check_record(stored: StoredItem, fqn: str) -> None:
    stored.seek(0)
    if not record_sizes_fit(stored, stored.length):
        raise corrupt_error(os.path.dirname(os.fspath(stored.path)) or stored.path, [
            f"{stored.path}: the record of {fqn!r} is not a torch.save record whose entries lie inside it "
            "(damaged or crafted)"])
    stored.seek(0)


def place_items(planner: LoadPlanner, items: list[ReadItem], stored: StoredItem) -> None:
    """The read items that one stored item serves, from its bytes, as DCP's FileSystemReader
    places them (but read and deserialized once for all of them). A whole stored tensor
    going into a target that matches it is read straight into the target (``_place_raw``)."""
    fqn = items[0].storage_index.fqn
    if items[0].type == LoadItemType.BYTE_IO:
        _check_record(stored, fqn)
        data = stored.read()
        for item in items:
            planner.load_bytes(item, io.BytesIO(data))
        return
    if _place_raw(planner, items, stored):
        return
    _check_record(stored, fqn)
    whole = torch.load(stored, map_location="cpu", weights_only=True)
    if not isinstance(whole, torch.Tensor):
        raise UnsafeCheckpointError(f"{stored.path}: tensor item {fqn!r} holds a {type(whole).__name__}, "
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
                f"refusing to unpickle {_where(self, read_item)}: {weights_only_refusal(e)}; nothing from it was "
                "run. Loading never runs code from checkpoint files: save such values as plain Python types, or "
                "admit the class with load_planner(safe_globals=[...])") from None
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

    reader = SafeFileSystemReader(step_dir, verify=verify)
    planner = SafeEmptyStateDictLoadPlanner(keys)
    try:
        dcp.load({}, storage_reader=reader, planner=planner, no_dist=True)
    except BaseException as e:
        reraise_user_error(e, reader)
    return planner.original_state_dict  # the dict the planner rebuilt from the metadata and filled
