"""Writing a step: DCP's file writer with cairn's commit protocol, hashing every byte as it goes out.

``CommittingWriter`` is the backend-neutral part: every rank writes its files through
hashing streams, sizes and hashes travel to the coordinator inside DCP's ``WriteResult``
list, and the coordinator, in ``finish``, writes DCP's ``.metadata``, then the manifest, and
then commits; a backend says where files go and how a step is committed. ``CairnStorageWriter``
is the local filesystem's (build it with ``LocalStore.writer``):

1. the coordinator empties ``.tmp-step-N`` in ``prepare_global_plan``, which DCP runs on
   the coordinator before it hands any rank its plan, so no rank writes into leftovers;
2. every rank writes its files there, hashing each byte as it is written, and fsyncs each
   file; ``torch.save``'s per-record CRC32 is switched off meanwhile (see ``zip_crc32_off``);
3. the coordinator, in ``finish``: DCP's ``.metadata`` (fsynced), then the manifest
   (fsynced), then an fsync of the staging dir;
4. one ``rename(.tmp-step-N, step-N)`` publishes the step, then the folder is fsynced
   (``commit.publish_staging``).

A step therefore becomes visible only once it is complete on every rank.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import io
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import xxhash
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from cairn.checkpoint import fsio
from cairn.checkpoint.commit import publish_staging
from cairn.checkpoint.errors import CheckpointError, SaveError
from cairn.checkpoint.faults import armed, fault_point
from cairn.checkpoint.layout import MANIFEST_NAME, METADATA_NAME, SAVE_ID_PREFIX, staging_name, step_name
from cairn.checkpoint.lease import LeaseLostError
from cairn.checkpoint.manifest import build_manifest, entries_from_metadata, manifest_bytes, normalize_info

logger = logging.getLogger("cairn")

# The WriteResult that carries a rank's file sizes and hashes to the coordinator; stripped
# before DCP's metadata is written, so stock readers never see it.
FILES_RESULT_PREFIX = "__cairn_files__/"


# --- torch.save without its CRC ---------------------------------------------------------------

_crc32_lock = threading.Lock()
_crc32_users = 0
_crc32_before = True


@contextlib.contextmanager
def zip_crc32_off():
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


# --- streams that hash what they write ------------------------------------------------------

PARALLEL_HASH_BYTES = 1 << 20
_hash_pool_lock = threading.Lock()
_hash_pool_instance = None


def hash_pool():
    """Threads that hash large writes while the writing thread is in the kernel (xxhash releases the GIL)."""
    global _hash_pool_instance
    with _hash_pool_lock:
        if _hash_pool_instance is None:
            from concurrent.futures import ThreadPoolExecutor

            _hash_pool_instance = ThreadPoolExecutor(max_workers=4, thread_name_prefix="cairn-hash")
        return _hash_pool_instance


class HashingStream(io.RawIOBase):
    """A write-only stream that hashes every byte on its way to ``_put`` (``hashing``).

    A large write is hashed on a pool thread while ``_put`` moves it (into the kernel, or onto
    the network), so the hash costs the save little beyond the write itself; ``write``
    returns once both are done (the caller may reuse its buffer), which also keeps the hash in
    stream order. Subclasses implement ``_put``.
    """

    def __init__(self, hashing: bool, rank: int | None = None):
        super().__init__()
        self._digest = xxhash.xxh3_128() if hashing else None
        self.size = 0
        # A seek means bytes may be overwritten: the running hash no longer describes the
        # stream, so the writer re-reads it instead.
        self.hash_valid = hashing
        self._rank = rank
        # Seconds this stream's writer spent on the hash beyond its writes: small writes hashed
        # inline, and waits for a large write's hash after the bytes were taken.
        self.hash_wait_s = 0.0
        self._fault_mid_data = armed("mid_data")
        # The OSError a write met (a full disk): torch.save reports it as an unreadable
        # "unexpected pos" RuntimeError, so the writer looks here for the real cause.
        self.error: OSError | None = None

    @abc.abstractmethod
    def _put(self, view: memoryview) -> None:
        """Store the bytes of ``view`` after those stored so far."""

    def write(self, data) -> int:
        try:
            return self._write(data)
        except OSError as e:
            self.error = e
            raise

    def _write(self, data) -> int:
        view = memoryview(data).cast("B")
        if self._digest is None:
            self._put(view)
        elif view.nbytes >= PARALLEL_HASH_BYTES:
            hashed = hash_pool().submit(self._digest.update, view)
            try:
                self._put(view)
            finally:
                start = time.perf_counter()
                hashed.result()
                self.hash_wait_s += time.perf_counter() - start
        else:
            self._put(view)
            start = time.perf_counter()
            self._digest.update(view)
            self.hash_wait_s += time.perf_counter() - start
        self.size += view.nbytes
        self._after_write()
        if self._fault_mid_data:
            self.flush()
            fault_point("mid_data", self._rank)
        return view.nbytes

    def _after_write(self) -> None:
        pass

    def hexdigest(self) -> str | None:
        return self._digest.hexdigest() if self.hash_valid else None

    def writable(self) -> bool:
        return True


class LocalWriterFile(HashingStream):
    """A local file written through ``HashingStream``, starting the disk's writeback each time
    ``writeback_every`` more bytes were written (0: never; see ``fsio.start_writeback``)."""

    def __init__(self, file: io.BufferedWriter, hashing: bool, writeback_every: int, rank: int | None):
        super().__init__(hashing, rank)
        self._file = file
        self._writeback_every = writeback_every
        self._size_at_writeback = 0  # self.size when writeback was last started
        self._written_back = 0  # file offset up to which it was started

    def _put(self, view: memoryview) -> None:
        self._file.write(view)

    def _after_write(self) -> None:
        if self._writeback_every and self.size - self._size_at_writeback >= self._writeback_every:
            self._writeback()

    def _writeback(self) -> None:
        self._size_at_writeback = self.size
        self._file.flush()
        end = self._file.tell()
        if end > self._written_back:  # where the call is missing, the final fsync does it all
            fsio.start_writeback(self._file.fileno(), self._written_back, end - self._written_back)
            self._written_back = end

    def seek(self, *args) -> int:
        self.hash_valid = False
        return self._file.seek(*args)

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


class WriterFileSystem(FileSystem):
    """DCP's local filesystem, except that files opened for writing are ``LocalWriterFile``s:
    hashed as written (``checksums``), their writeback started every ``writeback_every`` bytes
    (0: never)."""

    def __init__(self, checksums: bool = True, writeback_every: int = fsio.WRITEBACK_BYTES) -> None:
        self.checksums = checksums
        self.writeback_every = writeback_every
        self.rank: int | None = None
        self.digests: dict[str, tuple[int, str | None]] = {}  # file name -> (size, hash or None)
        self.hash_wait_s: dict[str, float] = {}  # file name -> LocalWriterFile.hash_wait_s
        self.errors: list[tuple[str, BaseException]] = []

    def reset_results(self) -> None:
        self.digests, self.hash_wait_s, self.errors = {}, {}, []

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if "w" not in mode:
            with super().create_stream(path, mode) as stream:
                yield stream
            return
        path = Path(path)
        with open(path, mode) as f:
            stream = LocalWriterFile(f, self.checksums, self.writeback_every, self.rank)
            try:
                yield stream
            except BaseException as e:
                # DCP's helper threads drop their exceptions; keep them (the OSError behind
                # torch.save's RuntimeError where there is one) for write_data.
                self.errors.append((path.name, stream.error or e))
                raise
            finally:
                try:
                    stream.close()
                except OSError as e:  # the buffered tail met a full disk
                    self.errors.append((path.name, e))
            self.digests[path.name] = (stream.size, stream.hexdigest())
            self.hash_wait_s[path.name] = stream.hash_wait_s


def new_save_id() -> str:
    # The prefix marks DCP metadata written by cairn, so a deleted manifest is noticed.
    return f"{SAVE_ID_PREFIX}{uuid.uuid4()}"


# --- what a failed save says ----------------------------------------------------------------------

_ERRNO_HINTS = {errno.EDQUOT: "quota exceeded", errno.EROFS: "the folder is on a read-only filesystem",
                errno.EACCES: "permission denied", errno.EPERM: "not permitted (a read-only folder?)",
                errno.EFBIG: "file size limit"}


def describe_os_error(e: OSError, folder: str | os.PathLike) -> str:
    """The cause of a failed write in a user's words: disk full with the free space seen, ..."""
    if e.errno == errno.ENOSPC:
        return f"disk full ({fsio.free_space_text(folder)})"
    hint = _ERRNO_HINTS.get(e.errno)
    text = os.strerror(e.errno) if e.errno else str(e)
    where = f" on {e.filename}" if getattr(e, "filename", None) else ""
    return f"{hint or text}{where}" if hint else f"{text}{where}"


class CommittingWriter(FileSystemWriter):
    """DCP's file writer with cairn's commit in ``finish``; backends fill in where and how.

    Subclasses set ``self.fs`` (a filesystem whose write streams are ``HashingStream``s that
    record ``digests``) and implement ``_prepare_staging`` (coordinator), ``_check_staging``
    (each rank), ``_write_metadata_bytes``/``_publish`` (coordinator) and ``_hash_staged``.
    """

    storage_kind = "dcp"

    def __init__(self, location: str, staging: Any, step: int, info: Mapping[str, Any] | None, *,
                 checksums: bool, **writer_options: Any):
        self.location = location  # where the step will live, for messages and StorageMeta
        self.step = step
        self.info = normalize_info(info)
        self.checksums = checksums
        super().__init__(staging, **writer_options)
        self.save_id = new_save_id()
        self.is_coordinator = False
        self.last_error: CheckpointError | None = None
        self.committed_at: float | None = None  # time.perf_counter() when the coordinator committed the step
        self.hash_wait_s: float | None = None  # this rank's writer's wait on its hashes (written here)
        # Set by async saves: writes this rank's files elsewhere (the writer process) and returns
        # what ``write_data`` would, the files result included.
        self.delegate: Callable[[CommittingWriter, SavePlan, SavePlanner], list[WriteResult]] | None = None
        # Called on the coordinator once the step is committed, with (step, location).
        self.on_commit: Callable[[int, str], None] | None = None
        # Called on the coordinator right before the step is published; raises to commit nothing
        # (the store's fence: whether this run still holds the folder's lease).
        self.fence: Callable[[], None] | None = None

    def __getstate__(self):  # the writer process and process-based async saves pickle the writer
        state = dict(self.__dict__)
        state["last_error"] = None
        state["delegate"] = None
        state["on_commit"] = None
        state["fence"] = None
        return state

    def _fence(self) -> None:
        """Backends call this right before the step becomes visible (the rename, the marker)."""
        if self.fence is not None:
            self.fence()
            fault_point("after_fence", self.rank)

    @property
    def checkpoint_id(self) -> str:
        return self.location

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None and str(checkpoint_id) not in (str(self.location), str(self.path)):
            raise CheckpointError(f"this writer saves step {self.step} into {self.location}; "
                                  f"it cannot also write checkpoint_id={checkpoint_id}")
        self.save_id = new_save_id()

    def storage_meta(self) -> StorageMeta | None:
        # The published location, as a plain string (no pathlib classes in the pickle).
        return StorageMeta(checkpoint_id=str(self.location), save_id=self.save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)
        self.is_coordinator = is_coordinator
        if getattr(self, "rank", None) is None:  # a DCP that does not pass rank= to storage writers
            self.rank = kwargs.get("rank", dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)
        self.fs.rank = self.rank
        if not kwargs.get("use_collectives", True):
            raise CheckpointError("cairn's commit protocol needs DCP collectives (use_collectives=True): "
                                  "the coordinator must see every rank's files before committing")

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        # Nothing is created here: the coordinator prepares a clean staging place in prepare_global_plan.
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        try:
            self._prepare_staging()
        except OSError as e:
            raise self._error("preparing", e) from e
        return super().prepare_global_plan(plans)

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        try:
            fault_point("before_data", self.rank)
            self._check_staging()
            if self.delegate is not None:
                future: Future[list[WriteResult]] = Future()
                future.set_result(self.delegate(self, plan, planner))
                return future
            self.fs.reset_results()
            try:
                with zip_crc32_off():
                    results = super().write_data(plan, planner).value()
            except Exception as e:
                cause = next((error for _, error in self.fs.errors if isinstance(error, OSError)), None)
                if cause is not None:
                    raise self._error("writing", cause) from e
                raise
            if self.fs.errors:
                name, error = self.fs.errors[0]
                raise error
            if len(results) != len(plan.items):
                raise CheckpointError(f"rank {self.rank}: wrote {len(results)} of {len(plan.items)} items of "
                                      f"step {self.step} (a writer thread failed; see the log above)")
            self.hash_wait_s = sum(self.fs.hash_wait_s.values()) if self.checksums else None
            results.append(self._files_result(results))
        except OSError as e:
            raise self._error("writing", e) from e
        except CheckpointError as e:
            self.last_error = e
            raise
        future = Future()
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
            if size is None or (self.checksums and checksum is None):  # not seen by our stream: hash it
                size, checksum = self._hash_staged(name)
            record.update(size=size, checksum=checksum if self.checksums else None, fqns=sorted(record["fqns"]))
        return WriteResult(index=MetadataIndex(f"{FILES_RESULT_PREFIX}{self.rank}"), size_in_bytes=0,
                           storage_data=files)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        try:
            fault_point("after_data_before_commit", self.rank)
            files: dict[str, dict] = {}
            dcp_results = []
            for rank_results in results:
                for result in rank_results:
                    if result.index.fqn.startswith(FILES_RESULT_PREFIX):
                        files.update(result.storage_data)
                    else:
                        dcp_results.append(result)
            self.fs.reset_results()
            self._write_metadata(metadata, dcp_results)
            files[METADATA_NAME] = self._metadata_record()
            entries, _ = entries_from_metadata(metadata)
            manifest = build_manifest(self.step, self.storage_kind, files, self.info, self.checksums, entries,
                                      save_id=self.save_id)
            self._publish(manifest_bytes(manifest))
            self.committed_at = time.perf_counter()
        except OSError as e:
            raise self._error("committing", e) from e
        except CheckpointError as e:
            self.last_error = e
            raise
        logger.info("committed checkpoint %s (%d files, %.1f MB)", self.location, len(files),
                    manifest["total_bytes"] / 1e6)
        if self.on_commit is not None:
            self.on_commit(self.step, str(self.location))

    def _write_metadata(self, metadata: Metadata, results: list[WriteResult]) -> None:
        """DCP's ``.metadata`` as DCP's own writer writes it (a temporary name, fsync, rename)."""
        FileSystemWriter.finish(self, metadata, [results])

    def _metadata_record(self) -> dict[str, Any]:
        size, checksum = self.fs.digests.get(METADATA_NAME + ".tmp", self.fs.digests.get(METADATA_NAME, (None, None)))
        if size is None or (self.checksums and checksum is None):
            size, checksum = self._hash_staged(METADATA_NAME)
        return {"size": size, "checksum": checksum if self.checksums else None}

    def _error(self, action: str, e: OSError) -> CheckpointError:
        """The one line for a failed write; a run that lost its folder's lease (its files removed
        by the new holder's start-up cleanup) is told that instead (the fence is asked)."""
        if self.fence is not None:
            try:
                self.fence()
            except LeaseLostError as lost:
                self.last_error = lost
                return lost
            except Exception:  # noqa: BLE001 - the fence's own write failed too (a full disk, the store
                pass  # down): the write's failure is the one to report
        where = f"rank {self.rank}: " if self.rank is not None else ""
        error = SaveError(f"{where}{action} checkpoint step {self.step} in {self._staging_text()} failed: "
                          f"{describe_os_error(e, self._free_space_path())}. Nothing was committed; earlier "
                          f"steps in {self.folder_text} are untouched")
        self.last_error = error
        return error

    # --- what a backend provides -------------------------------------------------------------

    @abc.abstractmethod
    def _prepare_staging(self) -> None:
        """Make the place this save's files are written to (nothing visible as a step yet)."""

    @abc.abstractmethod
    def _check_staging(self) -> None:
        """Raise if that place is gone or not this save's (another run took the folder)."""

    @abc.abstractmethod
    def _publish(self, manifest: bytes) -> None:
        """Write the manifest and commit the step: after this, and only after this, readers see it."""

    @abc.abstractmethod
    def _hash_staged(self, name: str) -> tuple[int, str | None]:
        """(size, xxh3-128 or None without checksums) of a file this save wrote."""

    def _staging_text(self) -> str:
        return str(self.path)

    @property
    def folder_text(self) -> str:
        """The checkpoint folder, as error messages name it."""
        return str(self.location)

    def _free_space_path(self) -> str:
        return str(self.path)


class CairnStorageWriter(CommittingWriter):
    """DCP's FileSystemWriter with cairn's local commit protocol (see the module doc).

    Build it with ``LocalStore.writer(step, info)`` identically on every rank and pass it to
    ``dcp.save`` / ``dcp.async_save`` as ``storage_writer``. The step becomes visible as
    ``step-N`` only when ``finish`` has published it on the coordinator.
    """

    def __init__(self, folder: Path, step: int, info: Mapping[str, Any] | None = None, *,
                 checksums: bool = True, **writer_options: Any):
        self.folder = Path(folder)
        self.final_dir = self.folder / step_name(step)
        self.staging_dir = self.folder / staging_name(step)
        super().__init__(str(self.final_dir), self.staging_dir, step, info, checksums=checksums, **writer_options)
        self.fs = WriterFileSystem(checksums, fsio.writeback_bytes())  # the writer process gets it in the pickle

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        if checkpoint_id is not None and Path(checkpoint_id) not in (self.final_dir, self.staging_dir):
            raise CheckpointError(f"this writer saves step {self.step} into {self.final_dir}; "
                                  f"it cannot also write checkpoint_id={checkpoint_id}")
        self.save_id = new_save_id()

    @property
    def checkpoint_id(self) -> Path:
        return self.final_dir

    def _prepare_staging(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.staging_dir.exists():
            logger.warning("removing leftovers of an earlier save of step %d in %s", self.step, self.staging_dir)
            shutil.rmtree(self.staging_dir)
        self.staging_dir.mkdir()
        fsio.fsync_dir(self.folder)

    def _check_staging(self) -> None:
        if not self.staging_dir.is_dir():
            raise CheckpointError(
                f"rank {self.rank}: staging dir {self.staging_dir} does not exist; the checkpoint folder "
                "(--checkpoint.folder) must be on a filesystem that every rank shares")

    def _hash_staged(self, name: str) -> tuple[int, str | None]:
        path = self.staging_dir / name
        if self.checksums:
            return fsio.hash_file(path)
        return path.stat().st_size, None

    def _publish(self, manifest: bytes) -> None:
        fsio.write_file_durably(self.staging_dir / MANIFEST_NAME, manifest)
        fsio.fsync_dir(self.staging_dir)
        self._fence()
        publish_staging(self.folder, self.staging_dir, self.step)

    def _staging_text(self) -> str:
        return str(self.staging_dir)

    @property
    def folder_text(self) -> str:
        return f"--checkpoint.folder {self.folder}"

    def _free_space_path(self) -> str:
        return str(self.folder)
