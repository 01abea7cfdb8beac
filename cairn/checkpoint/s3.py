"""Object storage behind the storage seam: ``S3Store`` for ``s3://bucket/prefix`` (AWS S3, MinIO, Ceph...).

An object store has no rename, so a step is committed by a marker object written last::

    s3://bucket/prefix/
        .cairn-lease.json                  the run that owns the folder (conditional puts)
        step-<N>.commit                    the commit marker: {"step", "save_id", "manifest_xxh3", ...}
        step-<N>/<save_id>/.metadata       DCP metadata, stock format
        step-<N>/<save_id>/__<r>_<i>.distcp
        step-<N>/<save_id>/cairn_manifest.json

Every save writes under a save id of its own (agreed by all ranks); once every rank's objects
and the manifest (size and xxh3-128 of every object) are complete, the coordinator puts the
marker with ``If-None-Match: *`` (a replaced step: ``If-Match`` on the marker it replaces),
so two writers can never both commit one step. Readers, resume, ``load_step`` and retention
look only at markers, and a reader checks the manifest against the marker's hash and every
object against the manifest. Retention deletes the marker first, so a half-deleted step is
never read; ``leftovers`` lists what a crash left (objects no marker points to, multipart
uploads never completed, a probe cut short) and ``cleanup_incomplete`` (holding the lease:
a run's start, ``cairn checkpoint clean``) removes it.

Whether the store honours those conditions is found out, not assumed (``s3_conditions``):
a store that does not is refused unless the user accepts running unprotected. The other
concerns live beside this module: ``s3_client`` (URIs, the client, bounded retries, errors),
``s3_writer`` (multipart uploads, DCP's writer), ``s3_reader`` (ranged reads, DCP's reader).
"""

from __future__ import annotations

import contextlib
import email.utils
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch.distributed as dist
import xxhash

from cairn.checkpoint.dcp_metadata import load_metadata_bytes, out_of_bounds, save_id_of, tensor_problems
from cairn.checkpoint.errors import CheckpointError, CorruptCheckpointError, corrupt_error, reraise_user_error
from cairn.checkpoint.faults import fault_point
from cairn.checkpoint.fsio import is_hf_dir
from cairn.checkpoint.layout import (
    LEASE_NAME,
    MANIFEST_NAME,
    METADATA_NAME,
    SAVE_ID_PREFIX,
    Leftover,
    step_name,
    step_of,
    steps_to_purge,
)
from cairn.checkpoint.lease import LeaseLostError
from cairn.checkpoint.manifest import (
    CHECKSUM_ALGORITHM,
    MAX_MANIFEST_BYTES,
    build_manifest,
    check_identity,
    holds,
    manifest_bytes,
    normalize_info,
    parse_manifest,
    relative_file_name,
)
from cairn.checkpoint.reader import SafeLoadPlanner
from cairn.checkpoint.s3_client import (
    S3Error,
    abort_upload,
    delete_key,
    delete_keys,
    exists,
    get_object,
    get_small,
    head,
    list_pages,
    list_uploads,
    parse_uri,
    put_bytes,
    s3_uri,
    transfer_pool,
)
from cairn.checkpoint.s3_conditions import PROBE_PREFIX, Conditions, ConditionalWrites, conditions_of, refusal
from cairn.checkpoint.s3_reader import MAX_METADATA_BYTES, S3StorageReader, download_files, download_to, hash_object
from cairn.checkpoint.s3_writer import S3StorageWriter, upload_file
from cairn.checkpoint.writer import new_save_id

logger = logging.getLogger("cairn")

MARKER_SUFFIX = ".commit"
MARKER_FORMAT = "cairn-commit"
# The marker's record again as user metadata, so a HEAD reads it: on servers that send a small
# body after its headers only once the client acknowledges them (Ceph RGW's default), a GET of
# a small object costs a 40 ms delayed ACK, a HEAD does not.
MARKER_METADATA = "cairn-marker"
# How a user accepts a store without conditional writes, for the refusal's message.
OPT_IN = ("--checkpoint.s3_unsafe_no_conditional_writes (open_store(..., s3_unsafe_no_conditional_writes=True) "
          "from a loop of your own)")
TEMP_IN_USE_S = 60.0  # a probe object younger than this may be another run's, in use
_PROBE_NAMES = (PROBE_PREFIX, ".cairn-write-probe-")  # the second: the writability probe of earlier cairn


class S3Store:
    """Committed steps, commits, verification, deletes, leftovers and the lease under ``s3://bucket/prefix``.

    ``unsafe_no_conditional_writes``: use a store that does not honour conditional writes
    (see ``s3_conditions``); refused otherwise, with one line naming what it lacks."""

    scheme = "s3"

    def __init__(self, bucket: str, prefix: str, *, unsafe_no_conditional_writes: bool = False):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.unsafe_no_conditional_writes = unsafe_no_conditional_writes
        self.fence: Callable[[], None] | None = None
        self.cleanup_thread: threading.Thread | None = None  # a background cleanup_incomplete
        self._warned_unprotected = False

    @classmethod
    def from_uri(cls, uri: str, **options: Any) -> S3Store:
        return cls(*parse_uri(uri), **options)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    def __getstate__(self):  # a writer (and its store) travels to the writer process; the fence and
        return {**self.__dict__, "fence": None, "cleanup_thread": None}  # the cleanup thread stay here

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def marker_key(self, step: int) -> str:
        return self._key(step_name(step) + MARKER_SUFFIX)

    def save_prefix(self, step: int, save_id: str) -> str:
        return self._key(f"{step_name(step)}/{save_id}")

    def step_url(self, step: int) -> str:
        return s3_uri(self.bucket, self._key(step_name(step)))

    # --- conditional writes and the commit fence -----------------------------------------------

    def check_conditional_writes(self, opt_in: str = OPT_IN) -> Conditions:
        """What the store does with conditional writes (probed once per endpoint and bucket);
        ``UnprotectedStoreError`` naming what it lacks, unless this store accepts running unprotected."""
        conditions = conditions_of(self.bucket, self.prefix)
        lacks = conditions.lacks()
        if lacks and not self.unsafe_no_conditional_writes:
            raise refusal(self.url, lacks, opt_in)
        if lacks and not self._warned_unprotected:
            self._warned_unprotected = True
            logger.warning("%s: the store does not honour %s; running unprotected as asked "
                           "(s3_unsafe_no_conditional_writes): two runs on this folder would not be stopped",
                           self.url, " or ".join(lacks))
        return conditions

    def _writes(self) -> ConditionalWrites:
        return ConditionalWrites(self.bucket, self.check_conditional_writes(), self.unsafe_no_conditional_writes)

    def set_fence(self, fence: Callable[[], None] | None) -> None:
        """Every commit into this store calls ``fence()`` right before it publishes (the marker's
        put), and commits nothing if it raises: the holder of the folder's lease passes
        ``FolderLease.confirm``, so a run that lost the folder commits nothing there."""
        self.fence = fence

    def check_writable(self) -> None:
        """A save could be written and committed here: the probe of conditional writes writes,
        replaces and deletes an object of its own (and refuses a store that lacks them)."""
        self.check_conditional_writes()

    # --- listing ---------------------------------------------------------------------------------

    def _top(self) -> tuple[list[str], list[str]]:
        """(object names, folder names) directly under the prefix."""
        base = self._key("")
        names, folders = [], []
        for page in list_pages(self.bucket, base, "/"):
            names += [item["Key"][len(base):] for item in page.get("Contents", [])]
            folders += [item["Prefix"][len(base):].rstrip("/") for item in page.get("CommonPrefixes", [])]
        return names, folders

    def list_objects(self, prefix: str) -> list[dict]:
        """Every object under ``prefix`` (``Key``, ``Size``, ``LastModified``)."""
        return [item for page in list_pages(self.bucket, prefix) for item in page.get("Contents", [])]

    def exists(self) -> bool:
        return any(page.get("KeyCount", 0) for page in list_pages(self.bucket, self._key("")))

    def committed_steps(self) -> list[int]:
        names, _ = self._top()
        steps = []
        for name in names:
            if name.endswith(MARKER_SUFFIX):
                step = step_of(name[:-len(MARKER_SUFFIX)])
                if step is not None:
                    steps.append(step)
        return sorted(steps)

    # --- commit markers and manifests ------------------------------------------------------------

    def read_marker(self, step: int) -> tuple[dict, str] | None:
        """(the marker, its ETag) of step ``step``, or None if it is not committed."""
        key = self.marker_key(step)
        found = head(self.bucket, key)
        if found is None:
            return None
        raw, etag = found.get("Metadata", {}).get(MARKER_METADATA), found["ETag"]
        if raw is None:  # a marker from before the record was also metadata: its body
            got = get_small(self.bucket, key)
            if got is None:
                return None
            raw, etag = got
        try:
            marker = json.loads(raw)
        except ValueError:
            marker = None
        if (not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT or marker.get("step") != step
                or not isinstance(marker.get("save_id"), str) or not relative_file_name(marker["save_id"])
                or "/" in marker["save_id"]):
            raise corrupt_error(self.step_url(step), [f"{s3_uri(self.bucket, key)}: not the commit marker of step "
                                                      f"{step} (damaged, crafted, or another step's)"])
        return marker, etag

    def committed_save_id(self, step: int) -> tuple[str, dict]:
        """(save id, marker) of committed step ``step``; CheckpointError if it is not committed."""
        found = self.read_marker(step)
        if found is None:
            raise CheckpointError(f"{self.step_url(step)} is not a committed step (no commit marker)")
        return found[0]["save_id"], found[0]

    def committed_manifest(self, step: int, marker: dict | None = None) -> tuple[str, dict]:
        """(save id, manifest) of committed step ``step``: the manifest checked against the marker
        (``marker``: the step's, already read)."""
        if marker is None:
            _, marker = self.committed_save_id(step)
        key = f"{self.save_prefix(step, marker['save_id'])}/{MANIFEST_NAME}"
        where = s3_uri(self.bucket, key)
        raw = get_object(self.bucket, key, limit=MAX_MANIFEST_BYTES)
        if raw is None:
            raise corrupt_error(self.step_url(step), [f"{where}: missing (the marker points to it)"])
        if len(raw) != marker.get("manifest_size") or xxhash.xxh3_128(raw).hexdigest() != marker.get("manifest_xxh3"):
            raise corrupt_error(self.step_url(step), [f"{where}: does not match its commit marker (modified?)"])
        manifest = parse_manifest(raw, where)
        problems = check_identity(manifest, step, where)  # bound to the marker by its hash above
        if problems:
            raise corrupt_error(self.step_url(step), problems)
        return marker["save_id"], manifest

    def read_manifest(self, step: int) -> dict | None:
        return self.committed_manifest(step)[1]

    def marker_etag(self, step: int) -> str | None:
        """The version of step ``step``'s marker now (None: not committed), for ``commit(previous=)``."""
        found = head(self.bucket, self.marker_key(step))
        return found["ETag"] if found is not None else None

    def commit(self, step: int, save_id: str, manifest: bytes, previous: str | None = None) -> None:
        """Put step ``step``'s marker, conditionally: only if the step is still what this save saw
        when it began (``previous``: the marker's version then, None: not committed). Two saves
        can never both commit from the same state; the one that comes second is refused."""
        record = json.dumps({"format": MARKER_FORMAT, "step": step, "save_id": save_id,
                             "manifest_size": len(manifest), "manifest_xxh3": xxhash.xxh3_128(manifest).hexdigest(),
                             "committed_unix": round(time.time(), 3)}, sort_keys=True)
        key = self.marker_key(step)
        writes = self._writes()
        replaced = self.read_marker(step) if previous is not None else None
        header = {MARKER_METADATA: record}
        version = (writes.replace(key, record.encode(), previous, "committing", header) if previous is not None
                   else writes.create(key, record.encode(), "committing", header))
        if version is None:
            raise CheckpointError(f"{self.step_url(step)} was committed by another save after this one began; "
                                  f"this save was not committed (is another run writing into {self.url}?)")
        self._fence_after_commit(step, key, version, replaced)
        if replaced is not None and replaced[0]["save_id"] != save_id:
            fault_point("during_replace")
            self.delete_prefix(self.save_prefix(step, replaced[0]["save_id"]) + "/")
            logger.info("replaced existing %s", self.step_url(step))

    def _fence_after_commit(self, step: int, key: str, version: str, replaced: tuple[dict, str] | None) -> None:
        """The fence again once the marker is in: a run stopped between its fence and its marker's
        put (or whose put kept retrying) while another run took the folder over, and whose objects
        that run's start-up then removed, takes its marker back (the one it replaced, if any, is
        put back) and commits nothing."""
        if self.fence is None:
            return
        try:
            self.fence()
        except LeaseLostError:
            with contextlib.suppress(CheckpointError):
                if replaced is None:
                    self._writes().delete(key, version)
                else:
                    body = json.dumps(replaced[0], sort_keys=True)
                    self._writes().replace(key, body.encode(), version, "restoring", {MARKER_METADATA: body})
            logger.error("took back the marker of %s: the folder's lease was lost while it was put",
                         self.step_url(step))
            raise

    def wait_for_cleanup(self) -> None:
        """A save waits for the start's cleanup in the background (it lists saves in progress:
        this run's first one must not be among them)."""
        if self.cleanup_thread is not None:
            self.cleanup_thread.join()

    # --- writing ---------------------------------------------------------------------------------

    def writer(self, step: int, info: Mapping[str, Any] | None = None, *, checksums: bool = True,
               process_group: dist.ProcessGroup | None = None, save_id: str | None = None,
               **writer_options: Any) -> S3StorageWriter:
        """A DCP StorageWriter committing step ``step`` here. Collective when a process group is
        initialized (the ranks agree on the save id over ``process_group``)."""
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        self.wait_for_cleanup()
        writer = S3StorageWriter(self, step, save_id or agreed_save_id(process_group), info, checksums=checksums,
                                 **writer_options)
        writer.fence = self.fence
        return writer

    def publish_dir(self, local: str | os.PathLike, step: int, info: Mapping[str, Any] | None = None, *,
                    storage: str | None = None, manifest: dict | None = None) -> str:
        """Upload a local folder of plain files as step ``step`` and commit it. With ``manifest`` (a
        local step's own), its records are kept and every file is checked against them while it
        uploads; else one is built from the hashes taken while uploading."""
        local = Path(local)
        self.check_conditional_writes()
        self.wait_for_cleanup()
        previous = self.marker_etag(step)
        save_id = new_save_id()
        prefix = self.save_prefix(step, save_id)
        paths = sorted(p for p in local.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
        futures = {path.relative_to(local).as_posix(): transfer_pool().submit(
            upload_file, path, self.bucket, f"{prefix}/{path.relative_to(local).as_posix()}") for path in paths}
        files, problems = {}, []
        for name, future in futures.items():
            try:
                size, checksum = future.result()
            except OSError as e:
                raise CheckpointError(f"uploading {local / name} to {s3_uri(self.bucket, prefix)} failed: "
                                      f"{e.strerror or e}") from None
            if manifest is not None:
                record = manifest["files"].get(name)
                if record is None or record.get("size") != size or (record.get("checksum")
                                                                   and record["checksum"] != checksum):
                    problems.append(f"{local / name}: does not match its manifest (changed while it was uploaded?)")
            files[name] = {"size": size, "checksum": checksum}
        if problems:
            self.delete_prefix(prefix + "/")
            raise corrupt_error(local, problems)
        if manifest is not None:  # the same save's manifest (its save id names the DCP save, not the folder)
            body = dict(manifest)
            body.pop("manifest_checksum", None)
            data = manifest_bytes(body)
        else:
            kind = storage or ("hf" if is_hf_dir(local) else "files")
            data = manifest_bytes(build_manifest(step, kind, files, normalize_info(info), checksums=True,
                                                 save_id=save_id))
        put_bytes(self.bucket, f"{prefix}/{MANIFEST_NAME}", data)
        fault_point("during_publish")
        try:
            if self.fence is not None:
                self.fence()
            self.commit(step, save_id, data, previous=previous)
        except CheckpointError:
            self.delete_prefix(prefix + "/")
            raise
        logger.info("committed checkpoint %s (%d files)", self.step_url(step), len(files))
        return self.step_url(step)

    @contextlib.contextmanager
    def staged_dir(self, step: int, info: Mapping[str, Any] | None = None, *, tag: str = "export",
                   storage: str | None = None) -> Iterator[Path]:
        """A local temporary folder whose files are uploaded and committed as step ``step``."""
        staging = Path(tempfile.mkdtemp(prefix=f"cairn-{tag}-"))
        try:
            yield staging
            self.publish_dir(staging, step, info, storage=storage)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    # --- reading ---------------------------------------------------------------------------------

    def reader(self, step, verify: bool = False) -> S3StorageReader:
        """A reader of committed step ``step`` (or ``step`` itself: a reader of a plain prefix, see ``step_store``)."""
        if isinstance(step, S3StorageReader):
            step.verify = verify
            return step
        return S3StorageReader(self, step, verify=verify)

    def load(self, state_dict: dict[str, Any], step: int, *, verify: bool = False, planner=None,
             process_group=None, no_dist: bool = False) -> S3StorageReader:
        import torch.distributed.checkpoint as dcp

        reader = self.reader(step, verify=verify)
        try:
            dcp.load(state_dict, storage_reader=reader, planner=planner or SafeLoadPlanner(),
                     process_group=process_group, no_dist=no_dist)
        except BaseException as e:
            reraise_user_error(e, reader)
        return reader

    @contextlib.contextmanager
    def local_copy(self, step: int) -> Iterator[Path]:
        """Step ``step``'s objects downloaded (and checked against the manifest) into a temporary folder."""
        save_id, manifest = self.committed_manifest(step)
        prefix = self.save_prefix(step, save_id)
        target = Path(tempfile.mkdtemp(prefix=f"cairn-step-{step}-"))
        try:
            problems = download_files(self.bucket, prefix, manifest, target)
            if problems:
                raise corrupt_error(self.step_url(step), problems)
            (target / MANIFEST_NAME).write_bytes(manifest_bytes(
                {k: v for k, v in manifest.items() if k != "manifest_checksum"}))
            yield target
        finally:
            shutil.rmtree(target, ignore_errors=True)

    # --- integrity -------------------------------------------------------------------------------

    def check_objects(self, prefix: str, manifest: Mapping[str, Any], names: Iterable[str] | None = None,
                      checksums: bool = True, progress: Callable[[int, int], None] | None = None) -> list[str]:
        """Problems of the objects under ``prefix`` against the manifest (sizes; hashes, streamed)."""
        files = manifest.get("files") or {}
        names = sorted(files) if names is None else sorted(set(names) & set(files))
        listed = {item["Key"][len(prefix) + 1:]: item["Size"] for item in self.list_objects(prefix + "/")}
        problems, to_hash = [], []
        for name in names:
            record = files[name]
            uri = s3_uri(self.bucket, f"{prefix}/{name}")
            if name not in listed:
                problems.append(f"{uri}: missing{holds(record)}")
            elif listed[name] != record.get("size"):
                problems.append(f"{uri}: {listed[name]} bytes, manifest says {record.get('size')}{holds(record)}")
            elif checksums and record.get("checksum"):
                to_hash.append((name, record))
        total = sum(record["size"] for _, record in to_hash)
        done = 0
        for name, record in to_hash:
            digest = hash_object(self.bucket, f"{prefix}/{name}", record["size"])
            done += record["size"]
            if progress is not None:
                progress(done, total)
            if digest != record["checksum"]:
                problems.append(f"{s3_uri(self.bucket, f'{prefix}/{name}')}: checksum mismatch ({CHECKSUM_ALGORITHM} "
                                f"{digest}, manifest says {record['checksum']}){holds(record)}")
        return problems

    def verify(self, step: int, checksums: bool = True, progress: Callable[[int, int], None] | None = None,
               notes: list[str] | None = None) -> list[str]:
        try:
            save_id, manifest = self.committed_manifest(step)
        except CorruptCheckpointError as e:
            return list(e.problems) or [str(e)]
        except CheckpointError as e:
            return [str(e)]
        prefix = self.save_prefix(step, save_id)
        problems = self.check_objects(prefix, manifest, checksums=checksums, progress=progress)
        where = s3_uri(self.bucket, prefix)
        if not problems and METADATA_NAME in manifest.get("files", {}):
            try:
                metadata = load_metadata_bytes(get_object(self.bucket, f"{prefix}/{METADATA_NAME}",
                                                          limit=MAX_METADATA_BYTES) or b"",
                                               f"{where}/{METADATA_NAME}")
            except CheckpointError as e:
                return list(getattr(e, "problems", None) or [str(e)])
            problems += check_identity(manifest, None, f"{where}/{MANIFEST_NAME}", save_id_of(metadata))
            sizes = {name: record["size"] for name, record in manifest["files"].items()}
            for index, info in metadata.storage_data.items():
                if info.relative_path not in sizes:
                    problems.append(f"{where}/{info.relative_path}: not in the manifest (DCP metadata points to it)")
                else:
                    problem = out_of_bounds(info.relative_path, index.fqn, info.offset, info.length,
                                            sizes[info.relative_path], f"{where}/{info.relative_path}")
                    if problem:
                        problems.append(problem)
            problems += tensor_problems(metadata, f"s3://{self.bucket}/{prefix}/{METADATA_NAME}", manifest)
        if checksums and manifest.get("checksum_algorithm") is None and notes is not None:
            notes.append(f"{self.step_url(step)}: saved without checksums; sizes checked only")
        return list(dict.fromkeys(problems))

    # --- deleting --------------------------------------------------------------------------------

    def delete_prefix(self, prefix: str) -> None:
        """Every object under ``prefix`` (best effort: logged; what stays is a leftover for later)."""
        uri = s3_uri(self.bucket, prefix)
        try:
            keys = [item["Key"] for item in self.list_objects(prefix)]
            failed = delete_keys(self.bucket, keys, uri) if keys else []
        except CheckpointError as e:
            logger.warning("could not delete the objects under %s (%s); `cairn checkpoint clean %s --yes` or the "
                           "next run's start removes them", uri, e, self.url)
            return
        if failed:
            logger.warning("could not delete %d objects under %s; `cairn checkpoint clean %s --yes` or the next "
                           "run's start removes them", len(failed), uri, self.url)

    def delete(self, step: int, pacer=None) -> bool:
        """The marker first (the step is gone for every reader at once), then its objects."""
        try:
            delete_key(self.bucket, self.marker_key(step))
        except CheckpointError as e:
            logger.warning("could not purge checkpoint %s: %s", self.step_url(step), e)
            return False
        fault_point("during_purge")
        self.delete_prefix(self._key(step_name(step)) + "/")
        if pacer is not None:
            pacer.pause()
        return True

    def purge(self, keep_latest_k: int, protect: Iterable[int] = (), pacer=None) -> list[int]:
        purged = [step for step in steps_to_purge(self.committed_steps(), keep_latest_k, protect)
                  if self.delete(step, pacer)]
        if purged:
            logger.info("purged checkpoints %s (keeping the newest %d)", purged, keep_latest_k)
        return purged

    # --- what crashes leave behind -----------------------------------------------------------------

    def leftovers(self) -> list[Leftover]:
        """What crashed saves, deletes and probes left under the prefix: objects of saves no marker
        names, multipart uploads never completed, probe objects. Never a committed step's objects
        (a step whose marker cannot be read is left alone: ``verify`` reports it)."""
        found: list[Leftover] = []
        names, folders = self._top()
        for name in names:
            if name.startswith(_PROBE_NAMES):
                item = head(self.bucket, self._key(name))
                age = _server_age(item) if item else None
                if age is not None and age < TEMP_IN_USE_S:
                    continue  # another run's probe, in flight now (a run probes before it takes the lease)
                found.append(Leftover("temp", s3_uri(self.bucket, self._key(name)), None,
                                      "an object of a probe cut short", item and item["ContentLength"], 1,
                                      item and item["LastModified"].timestamp()))
        for folder in folders:
            step = step_of(folder)
            if step is None:
                continue
            try:
                marker = self.read_marker(step)
            except CheckpointError:
                continue
            committed = marker[0]["save_id"] if marker is not None else None
            base = self._key(folder) + "/"
            by_save: dict[str, list[dict]] = {}
            for item in self.list_objects(base):
                save_id, slash, _ = item["Key"][len(base):].partition("/")
                if slash and save_id.startswith(SAVE_ID_PREFIX):  # only what cairn's saves write
                    by_save.setdefault(save_id, []).append(item)
            for save_id, items in sorted(by_save.items()):
                if save_id == committed:
                    continue
                found.append(Leftover("save", s3_uri(self.bucket, base + save_id), step,
                                      "objects of a save that was never committed",
                                      sum(item["Size"] for item in items), len(items),
                                      max(item["LastModified"] for item in items).timestamp()))
        for upload in list_uploads(self.bucket, self._key("")):
            relative = upload["Key"][len(self._key("")):]
            folder, _, rest = relative.partition("/")
            if step_of(folder) is None or "/" not in rest or not rest.startswith(SAVE_ID_PREFIX):
                continue  # not an object of a save into this folder
            found.append(Leftover("upload", s3_uri(self.bucket, upload["Key"]), step_of(folder),
                                  f"a multipart upload never completed (upload id {upload['UploadId'][:16]}...)",
                                  created=upload["Initiated"].timestamp()))
        return found

    def remove_leftover(self, leftover: Leftover) -> None:
        _, key = parse_uri(leftover.location)
        if leftover.kind == "save":
            self.delete_prefix(key + "/")
        elif leftover.kind == "upload":
            for upload in list_uploads(self.bucket, key):
                if upload["Key"] == key:
                    abort_upload(self.bucket, key, upload["UploadId"])
        elif leftover.kind == "temp":
            delete_key(self.bucket, key)

    def cleanup_incomplete(self, protect: Iterable[int] = (), background: bool = False) -> list[str]:
        """Remove what crashed saves left (call holding the lease): every leftover but those of
        steps in ``protect``; returns their URIs. ``background``: on a thread of its own
        (``cleanup_thread``), returning nothing; a new save never meets them (its objects are
        under a new save id)."""
        if background:
            self.cleanup_thread = threading.Thread(target=self._cleanup_logged, args=(protect,),
                                                   name="cairn-cleanup", daemon=True)
            self.cleanup_thread.start()
            return []
        protect = set(protect)
        removed = []
        for leftover in self.leftovers():
            if not leftover.removable or leftover.step in protect:
                continue
            try:
                self.remove_leftover(leftover)
            except S3Error as e:
                logger.warning("could not remove %s: %s", leftover.location, e)
                continue
            verb = "aborted an unfinished upload of" if leftover.kind == "upload" else "removed"
            logger.warning("%s %s (%s)", verb, leftover.location, leftover.why)
            removed.append(leftover.location)
        return removed

    def _cleanup_logged(self, protect: Iterable[int]) -> None:
        try:
            self.cleanup_incomplete(protect)
        except CheckpointError as e:  # the next start (or `cairn checkpoint clean`) tries again
            logger.warning("could not remove what crashed saves left in %s: %s", self.url, e)

    # --- the lease (see lease.py) -------------------------------------------------------------------

    def _lease_key(self) -> str:
        return self._key(LEASE_NAME)

    def lease_read(self) -> tuple[dict, str] | None:
        got = get_small(self.bucket, self._lease_key())
        if got is None:
            return None
        raw, etag = got
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise CheckpointError(f"{s3_uri(self.bucket, self._lease_key())}: not a cairn lease; if no run uses this "
                                  "folder, delete it")
        return record, etag

    def lease_create(self, record: dict) -> str | None:
        return self._writes().create(self._lease_key(), json.dumps(record).encode(), "taking the lease of")

    def lease_replace(self, record: dict, version: str) -> str | None:
        return self._writes().replace(self._lease_key(), json.dumps(record).encode(), version, "renewing the lease of")

    def lease_delete(self, version: str) -> None:
        self._writes().delete(self._lease_key(), version)

    def lease_age(self, version: str) -> float | None:
        """Seconds since the lease's version ``version`` was written, on the store's clock: the
        object's ``LastModified`` against the ``Date`` of the answer that reports it (both the
        server's). None if that version is gone."""
        found = head(self.bucket, self._lease_key())
        if found is None or found["ETag"].strip('"') != version.strip('"'):
            return None
        return _server_age(found)


def _server_age(answer: dict) -> float | None:
    """Seconds since the object a HEAD ``answer`` describes was written, on the server's clock
    (its ``LastModified`` against the answer's ``Date``); None if the answer lacks either."""
    date = (answer.get("ResponseMetadata") or {}).get("HTTPHeaders", {}).get("date")
    try:
        return email.utils.parsedate_to_datetime(date).timestamp() - answer["LastModified"].timestamp()
    except (KeyError, TypeError, ValueError):
        return None


def agreed_save_id(process_group=None) -> str:
    """A fresh save id, the same on every rank (rank 0's, broadcast) when a process group is up."""
    save_id = new_save_id()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        box = [save_id]
        dist.broadcast_object_list(box, src=dist.get_global_rank(process_group, 0) if process_group else 0,
                                   group=process_group)
        save_id = box[0]
    return save_id


def committed_step_at(bucket: str, prefix: str) -> tuple[S3Store, int] | None:
    """(store, step) when ``prefix`` names a committed cairn step (``<folder>/step-N`` with its marker)."""
    parent, _, name = prefix.rpartition("/")
    step = step_of(name)
    if step is not None:
        store = S3Store(bucket, parent)
        if store.read_marker(step) is not None:
            return store, step
    return None


@contextlib.contextmanager
def download_prefix(uri: str, what: str) -> Iterator[Path]:
    """The files at ``uri`` in a temporary local folder: a committed cairn step's (verified), or
    every object under a plain prefix (an HF folder in a bucket)."""
    bucket, prefix = parse_uri(uri)
    name = prefix.rpartition("/")[2]
    committed = committed_step_at(bucket, prefix)
    if committed is not None:
        with committed[0].local_copy(committed[1]) as path:
            yield path
        return
    target = Path(tempfile.mkdtemp(prefix="cairn-download-"))
    try:
        store = S3Store(bucket, prefix)
        keys = [(item["Key"], item["Size"]) for item in store.list_objects(prefix + "/" if prefix else "")]
        single = head(bucket, prefix) if not keys and prefix else None
        if single is not None:  # one object (a .pt file): as a local file
            path = target / name
            download_to(bucket, prefix, single["ContentLength"], path)
            yield path
            return
        if not keys:
            raise CheckpointError(f"{what} {uri}: nothing there (no objects under that prefix)")
        futures = []
        for key, size in keys:
            relative = key[len(prefix) + 1:] if prefix else key
            if not relative_file_name(relative):
                continue
            path = target / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            futures.append(transfer_pool().submit(download_to, bucket, key, size, path))
        for future in futures:
            future.result()
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)


def step_store(uri: str, what: str) -> tuple[Any, Any]:
    """(store, step) for a DCP checkpoint at ``uri``: a committed cairn step (``.../step-N``), or
    a plain DCP prefix written by another tool (its ``.metadata`` under the prefix)."""
    bucket, prefix = parse_uri(uri)
    committed = committed_step_at(bucket, prefix)
    if committed is not None:
        return committed
    store = S3Store(bucket, prefix)
    if not exists(bucket, f"{prefix}/{METADATA_NAME}" if prefix else METADATA_NAME):
        raise CheckpointError(f"{what} {uri}: neither a committed cairn step nor a DCP checkpoint (no {METADATA_NAME})")
    return store, S3StorageReader(store, None, data_prefix=prefix)


def upload_path(local: Path, uri: str) -> int:
    """A local file (to the object ``uri``) or folder (under the prefix ``uri``); returns the bytes sent."""
    if local.is_dir():
        return upload_folder(local, uri)
    bucket, key = parse_uri(uri)
    if not key or exists(bucket, key):
        raise CheckpointError(f"{uri} already exists or names no object; choose a new key (nothing is ever "
                              "overwritten)")
    return upload_file(local, bucket, key)[0]


def upload_folder(local: Path, uri: str) -> int:
    """Every file under ``local`` to the prefix ``uri`` (an export), concurrently; returns the bytes sent."""
    bucket, prefix = parse_uri(uri)
    store = S3Store(bucket, prefix)
    if store.exists():
        raise CheckpointError(f"{uri} already holds objects; choose a new prefix (nothing is ever overwritten)")
    futures = [transfer_pool().submit(upload_file, path, bucket,
                                      f"{prefix}/{path.relative_to(local).as_posix()}" if prefix
                                      else path.relative_to(local).as_posix())
               for path in sorted(local.rglob("*")) if path.is_file()]
    return sum(future.result()[0] for future in futures)
