"""The local (or shared POSIX) filesystem behind the storage seam: ``LocalStore``.

Step discovery, the rename-based commit (``writer.CairnStorageWriter``, ``commit.py``),
verification against the manifest, deletes that make a step disappear in one rename, and
start-up cleanup of what crashed saves left. The manager decides *when* and *what*; a store
decides *how it lands*, so that a reader never sees a partial step and a crash at any moment
leaves the older steps loadable. Names in the folder: see ``layout.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from cairn.checkpoint import fsio
from cairn.checkpoint.commit import publish_staging
from cairn.checkpoint.dcp_metadata import check_dcp_structure, load_metadata_file, save_id_of
from cairn.checkpoint.errors import CheckpointError, CorruptCheckpointError, reraise_user_error
from cairn.checkpoint.faults import fault_point
from cairn.checkpoint.layout import (
    LEASE_NAME,
    MANIFEST_NAME,
    METADATA_NAME,
    Leftover,
    aside_name,
    aside_step,
    is_trash,
    lease_generation,
    lease_name,
    staging_name,
    staging_step,
    step_name,
    step_of,
    steps_to_purge,
    trash_step,
)
from cairn.checkpoint.manifest import (
    build_manifest,
    check_files,
    check_identity,
    folder_step,
    manifest_bytes,
    normalize_info,
    read_manifest,
)
from cairn.checkpoint.reader import SafeFileSystemReader, SafeLoadPlanner
from cairn.checkpoint.writer import CairnStorageWriter, describe_os_error

logger = logging.getLogger("cairn")

WRITE_PROBE_PREFIX = ".cairn-write-probe-"
TEMP_IN_USE_S = 60.0  # a lease or probe temp file younger than this may be another run's, in use


def has_commit_marker(step_dir: Path) -> bool:
    """A local step is committed once it has a manifest (cairn) or ``.metadata`` (stock DCP)."""
    return (step_dir / MANIFEST_NAME).is_file() or (step_dir / METADATA_NAME).is_file()


class Pacer:
    """Spreads a large delete over time so it does not starve a writer on the same disk.

    Files are shrunk ``chunk_bytes`` at a time (``ftruncate``), sleeping ``pause_s`` after each
    chunk (``busy()`` true: ``busy_pause_s``), then unlinked: the filesystem frees their extents
    in pieces instead of in one burst of journal and discard work.
    """

    def __init__(self, chunk_bytes: int = 1 << 30, pause_s: float = 0.0, busy_pause_s: float = 0.05,
                 busy: Callable[[], bool] | None = None):
        self.chunk_bytes, self.pause_s, self.busy_pause_s, self.busy = chunk_bytes, pause_s, busy_pause_s, busy
        self.deleted_bytes = 0
        self.paused_s = 0.0

    def pause(self) -> None:
        pause = self.busy_pause_s if self.busy is not None and self.busy() else self.pause_s
        if pause > 0:
            time.sleep(pause)
            self.paused_s += pause

    def remove_tree(self, path: Path) -> bool:
        """``fsio.remove_tree`` with large files shrunk in chunks first."""
        try:
            for root, _, names in os.walk(path):
                for name in names:
                    file = Path(root) / name
                    with contextlib.suppress(OSError):
                        size = file.lstat().st_size
                        if not file.is_symlink() and size > self.chunk_bytes:
                            with open(file, "r+b") as f:
                                while size > 0:
                                    size = max(0, size - self.chunk_bytes)
                                    os.ftruncate(f.fileno(), size)
                                    self.deleted_bytes += self.chunk_bytes
                                    self.pause()
                        else:
                            self.deleted_bytes += size
        except OSError:
            pass  # remove_tree below reports what it cannot delete
        return fsio.remove_tree(path)


def _younger_than(path: Path, seconds: float) -> bool:
    with contextlib.suppress(OSError):
        return time.time() - path.lstat().st_mtime < seconds
    return True  # gone meanwhile: nothing to list


class LocalStore:
    """Step discovery, commits, verification, deletes and safe readers for one local checkpoint folder.

    Safe to share between threads: deletes and the listing they rely on hold one lock.
    """

    scheme = "file"

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise CheckpointError(f"checkpoint folder {self.folder} (--checkpoint.folder) exists and is not a "
                                  "directory")
        self._delete_lock = threading.Lock()
        self.cleanup_thread: threading.Thread | None = None  # a background cleanup_incomplete
        self._warned_links: set[str] = set()
        self.fence: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return f"LocalStore({str(self.folder)!r})"

    @property
    def url(self) -> str:
        return str(self.folder)

    def exists(self) -> bool:
        return self.folder.is_dir()

    # --- discovery -------------------------------------------------------------------------------

    def step_dir(self, step: int) -> Path:
        """``folder/step-<step>``; during (or after a crash in) a fallback replace, the aside copy."""
        path = self.folder / step_name(step)
        if not path.is_dir():
            aside = self.folder / aside_name(step)
            if aside.is_dir() and not aside.is_symlink() and has_commit_marker(aside):
                return aside
        return path

    def step_url(self, step: int) -> str:
        return str(self.step_dir(step))

    def committed_steps(self) -> list[int]:
        """Ascending steps whose ``step-N`` dir is committed (cairn manifest or stock DCP ``.metadata``).

        A ``step-N`` that is a symbolic link is not a step (logged once): cairn never follows
        links in a checkpoint folder."""
        if not self.folder.is_dir():
            return []
        committed, asides = set(), set()
        with os.scandir(self.folder) as entries:
            for entry in entries:
                step, aside = step_of(entry.name), aside_step(entry.name)
                if step is None and aside is None:
                    continue
                if entry.is_symlink():
                    if entry.name not in self._warned_links:
                        self._warned_links.add(entry.name)
                        logger.warning("%s is a symbolic link, not a step: ignored (cairn never follows links in a "
                                       "checkpoint folder)", entry.path)
                    continue
                if not entry.is_dir() or not has_commit_marker(Path(entry.path)):
                    continue
                (committed if step is not None else asides).add(step if step is not None else aside)
        committed |= {step for step in asides if not (self.folder / step_name(step)).is_dir()}
        return sorted(committed)

    def read_manifest(self, step: int | str | os.PathLike) -> dict | None:
        """The step's manifest (a step number or a step dir), None for a dir without one (stock
        DCP); corrupt -> CorruptCheckpointError."""
        return read_manifest(self._dir(step))

    def _dir(self, step: int | str | os.PathLike) -> Path:
        return self.step_dir(step) if isinstance(step, int) else Path(step)

    # --- writing ---------------------------------------------------------------------------------

    def writer(self, step: int, info: Mapping[str, Any] | None = None, *, checksums: bool = True,
               process_group=None, **writer_options: Any) -> CairnStorageWriter:
        """A DCP StorageWriter that stages, hashes, and atomically commits ``step-<step>``.

        ``info`` (JSON-able) is merged into the manifest's top level. ``writer_options`` go to
        DCP's FileSystemWriter (``thread_count``, ``single_file_per_rank``, ...). Nothing is
        agreed between ranks here (``process_group`` is for stores that must).
        """
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        writer = CairnStorageWriter(self.folder, step, info, checksums=checksums, **writer_options)
        writer.fence = self.fence
        return writer

    def set_fence(self, fence: Callable[[], None] | None) -> None:
        """Every commit into this folder calls ``fence()`` right before its publishing rename, and
        commits nothing if it raises: the holder of the folder's lease passes ``FolderLease.confirm``."""
        self.fence = fence

    def new_staging_dir(self, step: int, tag: str = "export") -> Path:
        """An empty ``.tmp-step-<step>-<tag>`` dir in the folder, for ``publish_dir``."""
        staging = self.folder / staging_name(step, tag)
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
        info = normalize_info(info)
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
                fsio.fsync_file(path)
                size, checksum = fsio.hash_file(path)
                files[path.relative_to(staging).as_posix()] = {"size": size, "checksum": checksum}
            for directory in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
                fsio.fsync_dir(directory)
            kind = storage or ("hf" if fsio.is_hf_dir(staging) else "files")
            manifest = build_manifest(step, kind, files, info, checksums=True)
            fsio.write_file_durably(staging / MANIFEST_NAME, manifest_bytes(manifest))
            fsio.fsync_dir(staging)
            if self.fence is not None:
                self.fence()
            final = publish_staging(self.folder, staging, step)
        except OSError as e:
            raise CheckpointError(f"committing step {step} from {staging} failed: {e}. Nothing was committed; "
                                  f"earlier steps in --checkpoint.folder {self.folder} are untouched") from e
        logger.info("committed %s checkpoint %s (%d files)", kind, final, len(files))
        return final

    @contextlib.contextmanager
    def staged_dir(self, step: int, info: Mapping[str, Any] | None = None, *, tag: str = "export",
                   storage: str | None = None) -> Iterator[Path]:
        """An empty staging folder whose files are committed as ``step-<step>`` when the block
        succeeds (``publish_dir``), deleted when it raises."""
        staging = self.new_staging_dir(step, tag)
        try:
            yield staging
            self.publish_dir(staging, step, info, storage=storage)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    @contextlib.contextmanager
    def local_copy(self, step: int | str | os.PathLike) -> Iterator[Path]:
        """A local folder holding the step's files: here, the step dir itself."""
        yield self._dir(step)

    def discard_staging(self, step: int) -> None:
        """Remove the staging dir of a failed save of ``step`` (no-op if there is none)."""
        staging = self.folder / staging_name(step)
        if staging.exists():
            fsio.remove_tree(staging)

    def check_writable(self) -> None:
        """Create the folder if needed and write, fsync and remove a small file in it: a read-only
        or full folder is found before training, not at the first save."""
        probe = self.folder / f"{WRITE_PROBE_PREFIX}{os.getpid()}"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fsio.write_file_durably(probe, b"cairn")
            probe.unlink()
        except OSError as e:
            with contextlib.suppress(OSError):
                probe.with_name(probe.name + ".tmp").unlink(missing_ok=True)
            raise CheckpointError(f"--checkpoint.folder {self.folder} is not writable: "
                                  f"{describe_os_error(e, self.folder)}") from None

    def free_bytes(self) -> int | None:
        """Bytes free to this user on the folder's filesystem (None where that cannot be asked)."""
        try:
            info = os.statvfs(self.folder if self.folder.exists() else self.folder.parent)
        except OSError:
            return None
        return info.f_bavail * info.f_frsize

    # --- the lease (see lease.py) ----------------------------------------------------------------
    #
    # A POSIX folder has no compare-and-swap, and a rename is not one (two contenders that both
    # read the old record both rename theirs over it). The lease is therefore a series of
    # generations, ``.cairn-lease-<N>.json``, each made by exclusive creation (a hard link of a
    # complete file: atomic on local and shared filesystems, NFS included). The newest holds.
    # Replacing generation N means creating N+1: of any number of contenders that read N, exactly
    # one creates it, and the others are refused. A write that succeeds is checked to be the
    # newest (one that creates N+1 after N+1 was superseded and removed, having been stopped long
    # enough, finds a newer one and takes its file back), then the generations below it are
    # removed. The series never restarts while a run uses the folder: a release is a generation
    # of its own (the record says ``released``).

    def _lease_generations(self) -> list[tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = []
        with os.scandir(self.folder) as entries:
            for entry in entries:
                generation = lease_generation(entry.name)
                if generation is not None:
                    found.append((generation, Path(entry.path)))
        return sorted(found)

    def lease_read(self) -> tuple[dict, str] | None:
        """(the newest lease record, its version) or None when the folder has none."""
        for _ in range(100):  # the newest one is removed only once a newer one exists: list again
            generations = self._lease_generations()
            if not generations:
                return None
            generation, path = generations[-1]
            try:
                record = json.loads(fsio.read_regular(path, limit=1 << 16))
            except FileNotFoundError:
                continue
            except (ValueError, CheckpointError, OSError) as e:
                raise CheckpointError(f"{path}: unreadable lease ({e}); if no run uses this folder, delete "
                                      "it") from None
            if not isinstance(record, dict) or not isinstance(record.get("token"), str):
                raise CheckpointError(f"{path}: not a cairn lease; if no run uses this folder, delete it")
            return record, str(generation)
        raise CheckpointError(f"{self.folder}: its lease changed 100 times while being read")

    def _lease_write(self, record: dict, generation: int) -> str | None:
        """Create generation ``generation`` holding ``record`` if it does not exist and nothing
        newer does; remove the older ones. Its version, or None."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f"{LEASE_NAME}.tmp-{record['token']}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        path = self.folder / lease_name(generation)
        try:
            with open(tmp, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            os.link(tmp, path)
        except FileExistsError:
            return None
        except OSError as e:
            raise CheckpointError(f"writing the lease of checkpoint folder {self.folder} failed: "
                                  f"{describe_os_error(e, self.folder)}") from None
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        generations = self._lease_generations()
        if generations and generations[-1][0] > generation:  # superseded while this writer was stopped
            path.unlink(missing_ok=True)
            return None
        for older, older_path in generations:
            if older < generation:
                older_path.unlink(missing_ok=True)
        fsio.fsync_dir(self.folder)
        return str(generation)

    def lease_create(self, record: dict) -> str | None:
        """Create the lease if the folder has none (the first generation); its version, or None."""
        generations = self._lease_generations()
        return None if generations else self._lease_write(record, 0)

    def lease_replace(self, record: dict, version: str) -> str | None:
        """Replace the lease if its version is still ``version`` (a compare-and-swap: the next
        generation, created exclusively); the new version, or None."""
        return self._lease_write(record, int(version) + 1)

    def lease_delete(self, version: str) -> None:
        """Remove the lease if its version is still ``version`` (the series restarts: a run
        releases its lease by replacing it with a released record instead)."""
        generations = self._lease_generations()
        if generations and str(generations[-1][0]) == version:
            for _, path in generations:
                path.unlink(missing_ok=True)
            fsio.fsync_dir(self.folder)

    def lease_age(self, version: str) -> float | None:
        """Seconds since the lease's version ``version`` was written, on the filesystem's clock:
        its file's mtime against that of a file written now in the same folder (a file server
        stamps both). None if that version is gone; CheckpointError where nothing can be written
        (a read-only or full folder: ``cairn checkpoint ls`` shows the age as not known)."""
        probe = self.folder / f"{WRITE_PROBE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            written = (self.folder / lease_name(int(version))).stat().st_mtime
        except OSError:
            return None
        try:
            with open(probe, "wb") as f:
                f.write(b"cairn")
                now = os.fstat(f.fileno()).st_mtime
        except OSError as e:
            raise CheckpointError(f"checkpoint folder {self.folder}: cannot tell how old its lease is (writing a "
                                  f"file there failed: {describe_os_error(e, self.folder)})") from None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
        return now - written

    # --- reading ---------------------------------------------------------------------------------

    def reader(self, step: int | str | os.PathLike, verify: bool = False) -> SafeFileSystemReader:
        """A safe DCP StorageReader for a step (its number, or a step dir; see ``reader.py``)."""
        return SafeFileSystemReader(self._dir(step), verify=verify)

    def load_planner(self, **planner_options: Any) -> SafeLoadPlanner:
        """DefaultLoadPlanner whose non-tensor items load with ``torch.load(weights_only=True)``.

        ``planner_options``: DefaultLoadPlanner's (``allow_partial_load``, ...) and
        ``safe_globals`` (extra classes to admit, as ``torch.serialization.safe_globals``).
        """
        return SafeLoadPlanner(**planner_options)

    def load(self, state_dict: dict[str, Any], step: int | str | os.PathLike, *, verify: bool = False,
             planner=None, process_group=None, no_dist: bool = False) -> SafeFileSystemReader:
        """``dcp.load`` through ``reader`` and ``load_planner``, in place, on every rank; returns the reader.

        A problem found on any rank is raised on every rank as the CheckpointError itself
        (not DCP's CheckpointException wrapper), so callers can catch CorruptCheckpointError.
        """
        import torch.distributed.checkpoint as dcp

        reader = self.reader(step, verify=verify)
        try:
            dcp.load(state_dict, storage_reader=reader, planner=planner or self.load_planner(),
                     process_group=process_group, no_dist=no_dist)
        except BaseException as e:
            reraise_user_error(e, reader)
        return reader

    # --- integrity -------------------------------------------------------------------------------

    def verify(self, step: int | str | os.PathLike, checksums: bool = True,
               progress: Callable[[int, int], None] | None = None, notes: list[str] | None = None) -> list[str]:
        """Every problem found in a step (its number or its dir), each naming its file (and what it
        holds); [] if sound.

        Checks the manifest (and that it is this step's), then each file's presence and size,
        then (``checksums``) its hash; for DCP dirs also that ``.metadata`` parses safely,
        belongs to the same save, and that every item it points to lies inside an existing
        file. A dir without a manifest (stock DCP) gets the structural checks only; that is
        said in ``notes`` (if given) and the log. ``progress(done, total)`` is called with bytes
        hashed so far.
        """
        step_dir = self._dir(step)
        notes = notes if notes is not None else []
        if step_dir.is_symlink():
            return [f"{step_dir} is a symbolic link; cairn never follows links in a checkpoint folder"]
        if not step_dir.is_dir():
            return [f"{step_dir}: no such checkpoint directory"]
        problems: list[str] = []
        manifest = None
        try:
            manifest = self.read_manifest(step_dir)
        except CorruptCheckpointError as e:
            problems.extend(e.problems)
        if manifest is not None:
            problems.extend(check_identity(manifest, folder_step(step_dir), step_dir / MANIFEST_NAME))
            problems.extend(check_files(step_dir, manifest, checksums=checksums, progress=progress))
            if checksums and manifest.get("checksum_algorithm") is None:
                notes.append(f"{step_dir}: saved without checksums; sizes checked only")
        elif not problems and not (step_dir / METADATA_NAME).exists():
            return [f"{step_dir}: neither {MANIFEST_NAME} nor {METADATA_NAME}: not a committed checkpoint"]
        elif not problems:
            notes.append(f"{step_dir}: no {MANIFEST_NAME} (not written by cairn): checksums unavailable, "
                         "structure checked only")
            logger.warning(notes[-1])
        if (step_dir / METADATA_NAME).exists() or (step_dir / METADATA_NAME).is_symlink():
            found = check_dcp_structure(step_dir, manifest_expected=manifest is None and not problems,
                                        manifest=manifest)
            problems.extend(p for p in found if p not in problems)
            if manifest is not None and not found:
                with contextlib.suppress(CheckpointError):
                    save_id = save_id_of(load_metadata_file(step_dir / METADATA_NAME))
                    problems.extend(check_identity(manifest, None, step_dir / MANIFEST_NAME, save_id))
        return problems

    # --- deleting --------------------------------------------------------------------------------

    def delete(self, step: int, pacer: Pacer | None = None) -> bool:
        """Make committed step ``step`` disappear in one rename (to a trash name), then delete it
        (paced by ``pacer``); False (logged) if the rename failed and the step is still there."""
        with self._delete_lock:
            path = self.step_dir(step)
            trash = self.folder / fsio.trash_name(step_name(step))
            try:
                os.rename(path, trash)
                fsio.fsync_dir(self.folder)
            except OSError as e:
                logger.warning("could not purge checkpoint %s: %s", path, e)
                return False
        fault_point("during_purge")
        if pacer is not None:
            pacer.remove_tree(trash)
        else:
            fsio.remove_tree(trash)
        return True

    def purge(self, keep_latest_k: int, protect: Iterable[int] = (), pacer: Pacer | None = None) -> list[int]:
        """Delete committed steps older than the newest ``keep_latest_k`` (0 keeps all).

        Never the newest committed step, never a step in ``protect`` (being written), never a
        staging dir. Each step is renamed to a trash name first, so it disappears in one
        atomic step; a failing delete is logged and skipped. Safe in a background thread.
        Returns the steps that are no longer visible.
        """
        purged = [step for step in steps_to_purge(self.committed_steps(), keep_latest_k, protect)
                  if self.delete(step, pacer)]
        self.remove_trash(pacer)
        if purged:
            logger.info("purged checkpoints %s (keeping the newest %d)", purged, keep_latest_k)
        return purged

    def remove_trash(self, pacer: Pacer | None = None) -> None:
        """Finish deletes that left their trash behind (a failed or interrupted delete)."""
        for leftover in self._names(is_trash):
            (pacer.remove_tree if pacer is not None else fsio.remove_tree)(leftover)

    def leftovers(self) -> list[Leftover]:
        """What crashed saves and deletes left in the folder: staging dirs, trash, the old copy of
        an interrupted replace, files of a lease or probe being written; and ``step-N`` dirs with
        neither manifest nor DCP metadata (not cairn's: listed, never removed). Never a committed step."""
        found = []
        names = self._names(lambda name: True)  # one listing: a renewal after it makes no live lease "older"
        newest_lease = max((g for path in names if (g := lease_generation(path.name)) is not None), default=None)
        for path in names:
            name = path.name
            if path.is_symlink():
                continue  # never followed, never deleted through: logged by committed_steps
            if (step := staging_step(name)) is not None:
                kind, why = "staging", "staging dir of a save in progress or one that did not finish"
            elif is_trash(name):
                kind, step, why = "trash", trash_step(name), "a delete that did not finish"
            elif name.startswith((LEASE_NAME + ".tmp-", WRITE_PROBE_PREFIX)):
                if _younger_than(path, TEMP_IN_USE_S):
                    continue  # another run's, being written now (a run probes the folder before its lease)
                kind, step, why = "temp", None, "a lease or probe file being written when its run died"
            elif (generation := lease_generation(name)) is not None and generation < newest_lease:
                kind, step, why = "temp", None, "an older generation of the lease (its writer stopped before removing it)"
            elif (step := aside_step(name)) is not None:
                kind, why = "aside", ("old copy of a replaced step" if (self.folder / step_name(step)).is_dir()
                                      else "a replace cut short: restored as " + step_name(step))
            elif step_of(name) is not None and path.is_dir() and not has_commit_marker(path):
                kind, step, why = "foreign", step_of(name), ("no manifest or .metadata: not written by cairn (a save "
                                                             "by another tool that did not finish?)")
            else:
                continue
            num_bytes, num_files = fsio.tree_usage(path)
            created = None
            with contextlib.suppress(OSError):
                created = path.lstat().st_mtime
            found.append(Leftover(kind, str(path), step, why, num_bytes, num_files, created))
        return found

    def remove_leftover(self, leftover: Leftover) -> bool:
        """Remove one leftover (an interrupted replace's aside copy is restored as its step
        instead when that step is missing); whether it is gone."""
        path = Path(leftover.location)
        if leftover.kind == "foreign":
            return False
        if leftover.kind == "aside":
            final = self.folder / step_name(leftover.step)
            if not final.is_dir() and has_commit_marker(path):
                os.rename(path, final)
                fsio.fsync_dir(self.folder)
                logger.warning("restored %s from %s (a replace was interrupted)", final, path)
                return True
        gone = fsio.remove_tree(path) if path.is_dir() else fsio.unlink_quietly(path)
        if gone:
            logger.warning("removed %s (%s)", path, leftover.why)
        return gone

    def cleanup_incomplete(self, protect: Iterable[int] = (), background: bool = False) -> list[Path]:
        """Remove what crashed saves left behind; call at job start on one rank, holding the lease.

        Every leftover (``leftovers``) but the staging dirs of steps in ``protect``; an aside copy
        from an interrupted replace is restored as ``step-N`` if that is missing. ``step-N`` dirs
        cairn did not write are only logged. ``background``: each directory is renamed out of the
        way now (a new save of the same step never meets it) and deleted on a thread of its own
        (``cleanup_thread``): deleting a crashed 16 GB save took 2 s of a restart. Returns the
        paths removed, restored, or being removed.
        """
        protect = set(protect)
        removed: list[Path] = []
        later: list[Leftover] = []
        for leftover in self.leftovers():
            path = Path(leftover.location)
            if leftover.kind == "foreign":
                logger.warning("%s: %s; it is ignored (delete it by hand if unwanted)", leftover.location, leftover.why)
            elif leftover.kind == "staging" and leftover.step in protect:
                continue
            elif background and leftover.kind != "aside" and path.is_dir():
                if leftover.kind != "trash":
                    target = self.folder / fsio.trash_name(path.name)
                    try:
                        os.rename(path, target)
                    except OSError as e:
                        logger.warning("could not move %s out of the way (%s); the next start tries again", path,
                                       e.strerror or e)
                        continue
                    leftover = dataclasses.replace(leftover, location=str(target),
                                                   why=f"{leftover.why}: {path.name}")
                later.append(leftover)
                removed.append(path)
            elif self.remove_leftover(leftover):
                removed.append(path)
        if removed:
            fsio.fsync_dir(self.folder)
        if later:
            self.cleanup_thread = threading.Thread(target=lambda: [self.remove_leftover(x) for x in later],
                                                   name="cairn-cleanup", daemon=True)
            self.cleanup_thread.start()
        return removed

    def _names(self, keep: Callable[[str], bool]) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(self.folder / name for name in os.listdir(self.folder) if keep(name))
