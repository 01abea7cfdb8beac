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
never read; start-up cleanup (holding the lease) removes objects no marker points to and
aborts multipart uploads left by a crash.

Transfers: each rank uploads its own objects, large ones as concurrent multipart uploads
(``CAIRN_S3_PART_MB``, default 64 MiB parts, ``CAIRN_S3_CONNECTIONS`` at once, default 16),
hashing every byte on the way; loads read with concurrent ranged GETs. Throttling (503
SlowDown), timeouts and dropped connections are retried with backoff, bounded (botocore's
standard retry mode, plus a bounded retry of a body cut short). Credentials and endpoint come
the way every AWS tool takes them (environment, ``~/.aws/credentials`` and ``config``,
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for S3-compatible stores); nothing secret is
logged or written anywhere.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import logging
import os
import pickle
import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import boto3
import torch.distributed as dist
import xxhash
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from torch.distributed.checkpoint.filesystem import FileSystemBase
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from cairn.checkpoint.dcp_metadata import load_metadata_bytes, out_of_bounds, save_id_of, tensor_problems
from cairn.checkpoint.errors import CheckpointError, CorruptCheckpointError, corrupt_error, reraise_user_error
from cairn.checkpoint.faults import fault_point
from cairn.checkpoint.fsio import is_hf_dir
from cairn.checkpoint.layout import (
    LEASE_NAME,
    MANIFEST_NAME,
    METADATA_NAME,
    step_name,
    step_of,
    steps_to_purge,
)
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
from cairn.checkpoint.reader import BytesSlice, SafeLoadPlanner, accept_metadata, place_items, tiles
from cairn.checkpoint.writer import CommittingWriter, HashingStream, new_save_id

logger = logging.getLogger("cairn")

MARKER_SUFFIX = ".commit"
MARKER_FORMAT = "cairn-commit"
PART_ENV, CONNECTIONS_ENV = "CAIRN_S3_PART_MB", "CAIRN_S3_CONNECTIONS"
MIN_PART_BYTES = 5 << 20  # S3's smallest part (but the last)
MAX_ATTEMPTS = 8  # per request, with backoff (botocore's standard mode); a cut body the same
READ_AHEAD_BYTES = 1 << 30  # bytes of items downloaded ahead of placing them, per rank
SPAN_GAP_BYTES = 1 << 20  # bytes between two keys of a file that one GET reads through rather than ask twice
_MAX_METADATA_BYTES = 2 << 30


def part_bytes() -> int:
    raw = os.environ.get(PART_ENV, "").strip()
    value = float(raw) if raw else 64.0
    if value * (1 << 20) < MIN_PART_BYTES:
        raise CheckpointError(f"{PART_ENV}={raw!r}: parts are at least 5 MiB")
    return int(value * (1 << 20))


def connections() -> int:
    raw = os.environ.get(CONNECTIONS_ENV, "").strip()
    value = int(raw) if raw else 16
    if value < 1:
        raise CheckpointError(f"{CONNECTIONS_ENV}={raw!r}: expected a number >= 1")
    return value


def parse_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix without slashes at either end) of ``s3://bucket/prefix``."""
    if not uri.lower().startswith("s3://"):
        raise CheckpointError(f"{uri}: not an s3:// URI")
    rest = uri[5:]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise CheckpointError(f"{uri}: no bucket (expected s3://bucket/prefix)")
    return bucket, prefix.strip("/")


# --- the client ---------------------------------------------------------------------------------

_clients: dict[tuple, Any] = {}
_client_lock = threading.Lock()


_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_REGION",
               "AWS_DEFAULT_REGION", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")


def client():
    """This process's boto3 S3 client (thread-safe; made again after a fork, or when the
    environment that configures it changes)."""
    pid = (os.getpid(), tuple(os.environ.get(name) for name in _CLIENT_ENV))
    with _client_lock:
        made = _clients.get(pid)
        if made is None:
            config = Config(retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
                            max_pool_connections=max(32, 2 * connections()), connect_timeout=10, read_timeout=120,
                            tcp_keepalive=True)
            session = boto3.session.Session()
            made = session.client("s3", config=config,
                                  region_name=session.region_name or os.environ.get("AWS_REGION") or "us-east-1")
            _clients.clear()
            _clients[pid] = made
        return made


_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def transfer_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that move parts of objects (one pool per process)."""
    pid = os.getpid()
    with _client_lock:
        pool = _pools.get(pid)
        if pool is None:
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=connections(), thread_name_prefix="cairn-s3")
            _pools.clear()
            _pools[pid] = pool
        return pool


def error_code(error: BaseException) -> str | None:
    response = getattr(error, "response", None)
    return (response or {}).get("Error", {}).get("Code") if isinstance(response, dict) else None


def explain(error: BaseException, uri: str, action: str) -> CheckpointError:
    """One clear CheckpointError for a failed S3 call on ``uri``; never any credential."""
    code = error_code(error)
    name = type(error).__name__
    if code in ("NoSuchBucket",):
        why = "the bucket does not exist"
    elif code in ("AccessDenied", "403", "AllAccessDisabled"):
        why = "access denied: the credentials in use may not do this (check the bucket policy)"
    elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
        why = "the credentials were refused (wrong or expired access key; see AWS_ACCESS_KEY_ID / ~/.aws/credentials)"
    elif name == "NoCredentialsError":
        why = ("no AWS credentials found (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, or an "
               "instance role)")
    elif name in ("EndpointConnectionError", "ConnectTimeoutError"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "the AWS endpoint"
        why = f"cannot connect to {endpoint} (AWS_ENDPOINT_URL)"
    elif code in ("SlowDown", "503", "ServiceUnavailable", "RequestTimeout"):
        why = f"the store kept refusing ({code}) after {MAX_ATTEMPTS} attempts"
    else:
        why = f"{code or name}: {str(error).splitlines()[0] if str(error) else name}"
    return CheckpointError(f"{action} {uri} failed: {why}")


def _retrying(what: Callable[[], Any], attempts: int = MAX_ATTEMPTS) -> Any:
    """``what()`` again (with backoff) when a response body was cut short; botocore itself
    retries failed requests, but not a body that breaks off while it is read."""
    delay = 0.2
    for attempt in range(attempts):
        try:
            return what()
        except (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError,
                EndpointConnectionError, ConnectionError) as e:
            if attempt == attempts - 1:
                raise
            logger.warning("S3 transfer interrupted (%s); retrying in %.1f s", type(e).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
    return None  # pragma: no cover


def get_range(bucket: str, key: str, start: int, length: int, into: memoryview | None = None) -> bytes | None:
    """Bytes ``start .. start + length`` of an object (into ``into`` when given)."""

    def fetch():
        response = client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
        data = response["Body"].read()  # one read: faster than urllib3's readinto into the buffer here
        got = len(data)
        if into is not None and got == length:
            into[:length] = data
        if got != length:
            raise CheckpointError(f"s3://{bucket}/{key}: {got} bytes where {length} were asked for at byte "
                                  f"{start} (the object is shorter than its record)")
        return None if into is not None else data

    if length == 0:
        return b"" if into is None else None
    return _retrying(fetch)


def get_small(bucket: str, key: str) -> tuple[bytes, str] | None:
    """(its first 64 KiB, its ETag) of a small object (a marker, the lease), or None if it does not exist."""
    try:
        response = client().get_object(Bucket=bucket, Key=key)
        return response["Body"].read(1 << 16), response["ETag"]
    except Exception as e:  # noqa: BLE001
        if error_code(e) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise explain(e, f"s3://{bucket}/{key}", "reading") from None


def get_object(bucket: str, key: str, limit: int | None = None) -> bytes | None:
    """The whole object, or None if it does not exist; CheckpointError if larger than ``limit``."""
    try:
        head = client().head_object(Bucket=bucket, Key=key)
    except Exception as e:  # noqa: BLE001 - 404 is "missing", everything else is explained
        if error_code(e) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise explain(e, f"s3://{bucket}/{key}", "reading") from None
    size = head["ContentLength"]
    if limit is not None and size > limit:
        raise CheckpointError(f"s3://{bucket}/{key}: {size} bytes, more than such an object can hold ({limit})")
    return get_range(bucket, key, 0, size) if size else b""


# --- uploads ----------------------------------------------------------------------------------------

class S3UploadStream(HashingStream):
    """A write-only stream to one object: parts of ``part_bytes()`` go up concurrently as a multipart
    upload (at most ``in_flight`` at once per stream), hashed on the way; ``close`` completes it."""

    def __init__(self, bucket: str, key: str, *, hashing: bool, rank: int | None = None, in_flight: int = 4):
        super().__init__(hashing, rank)
        self.bucket, self.key = bucket, key
        self._part = part_bytes()
        self._buffer = bytearray(self._part)
        self._filled = 0
        self._upload_id: str | None = None
        self._parts: list[concurrent.futures.Future] = []
        self._slots = threading.Semaphore(in_flight)
        self._spare: list[bytearray] = []
        self._closed = False
        self._failed: BaseException | None = None
        self._fault_upload = True

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def _put(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            n = min(len(view) - done, self._part - self._filled)
            self._buffer[self._filled:self._filled + n] = view[done:done + n]
            self._filled += n
            done += n
            if self._filled == self._part:
                self._send_part()

    def _send_part(self) -> None:
        if self._failed is not None:
            raise self._failed
        if self._upload_id is None:
            try:
                self._upload_id = client().create_multipart_upload(Bucket=self.bucket, Key=self.key)["UploadId"]
            except Exception as e:  # noqa: BLE001
                raise explain(e, self.uri, "starting the upload of") from None
        # A full part goes as it is (botocore takes a bytearray), the last one as a copy of its bytes.
        data = self._buffer if self._filled == len(self._buffer) else self._buffer[:self._filled]
        self._buffer = self._spare.pop() if self._spare else bytearray(self._part)
        self._filled = 0
        number = len(self._parts) + 1
        self._slots.acquire()
        self._parts.append(transfer_pool().submit(self._upload_part, number, data))
        if self._fault_upload:
            self._fault_upload = False
            self._parts[-1].result()
            fault_point("during_upload", self._rank)

    def _upload_part(self, number: int, data: bytearray) -> dict:
        try:
            etag = client().upload_part(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number,
                                        Body=data)["ETag"]
            return {"PartNumber": number, "ETag": etag}
        except Exception as e:  # noqa: BLE001
            self._failed = explain(e, self.uri, f"uploading part {number} of")
            raise self._failed from None
        finally:
            if len(data) == self._part and len(self._spare) < 2:
                self._spare.append(data)
            self._slots.release()

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return self.size

    def fileno(self) -> int:
        raise io.UnsupportedOperation("an S3 upload has no file descriptor")

    def seek(self, *args) -> int:
        raise io.UnsupportedOperation("an S3 upload cannot seek")

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._upload_id is None:
                data = bytes(self._buffer[:self._filled])
                try:
                    client().put_object(Bucket=self.bucket, Key=self.key, Body=data)
                except Exception as e:  # noqa: BLE001
                    raise explain(e, self.uri, "writing") from None
                return
            if self._filled:
                self._send_part()
            parts = [future.result() for future in self._parts]
            try:
                client().complete_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id,
                                                   MultipartUpload={"Parts": parts})
            except Exception as e:  # noqa: BLE001
                raise explain(e, self.uri, "completing the upload of") from None
        except BaseException:
            self.abort()
            raise
        finally:
            self._buffer, self._spare = bytearray(), []

    def abort(self) -> None:
        if self._upload_id is not None:
            for future in self._parts:
                with contextlib.suppress(BaseException):
                    future.result()
            with contextlib.suppress(Exception):
                client().abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id)
            self._upload_id = None


def put_bytes(bucket: str, key: str, data: bytes, **conditions: str) -> str:
    """Put one small object; returns its ETag. ``conditions``: IfNoneMatch / IfMatch."""
    return client().put_object(Bucket=bucket, Key=key, Body=data, **conditions)["ETag"]


def upload_file(path: Path, bucket: str, key: str) -> tuple[int, str]:
    """Upload a local file (multipart when large), hashing it on the way: (size, xxh3-128)."""
    stream = S3UploadStream(bucket, key, hashing=True)
    stream._fault_upload = False
    try:
        with open(path, "rb", buffering=0) as f:
            chunk = bytearray(8 << 20)
            view = memoryview(chunk)
            while n := f.readinto(chunk):
                stream.write(view[:n])
    except BaseException:
        stream.abort()
        raise
    stream.close()
    return stream.size, stream.hexdigest()


class S3FileSystem(FileSystemBase):
    """What DCP's file writer needs of a place to write: streams that upload and hash."""

    def __init__(self, bucket: str, checksums: bool = True):
        self.bucket = bucket
        self.checksums = checksums
        self.rank: int | None = None
        self.digests: dict[str, tuple[int, str | None]] = {}
        self.hash_wait_s: dict[str, float] = {}
        self.errors: list[tuple[str, BaseException]] = []

    def reset_results(self) -> None:
        self.digests, self.hash_wait_s, self.errors = {}, {}, []

    def _key(self, path) -> str:
        bucket, key = parse_uri(str(path))
        return key

    @contextlib.contextmanager
    def create_stream(self, path, mode):
        if "w" not in mode:
            raise io.UnsupportedOperation("S3FileSystem writes only; reads go through S3StorageReader")
        key = self._key(path)
        name = key.rsplit("/", 1)[-1]
        stream = S3UploadStream(self.bucket, key, hashing=self.checksums, rank=self.rank)
        try:
            yield stream
        except BaseException as e:
            self.errors.append((name, e))
            stream.abort()
            raise
        stream.close()
        self.digests[name] = (stream.size, stream.hexdigest())
        self.hash_wait_s[name] = stream.hash_wait_s

    def concat_path(self, path, suffix: str) -> str:
        return f"{str(path).rstrip('/')}/{suffix}"

    def init_path(self, path) -> str:
        return str(path)

    def rename(self, path, new_path) -> None:
        source, target = self._key(path), self._key(new_path)
        client().copy_object(Bucket=self.bucket, Key=target, CopySource={"Bucket": self.bucket, "Key": source})
        client().delete_object(Bucket=self.bucket, Key=source)

    def mkdir(self, path) -> None:
        pass  # prefixes are not made

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return str(checkpoint_id).lower().startswith("s3://")

    def exists(self, path) -> bool:
        return _exists(self.bucket, self._key(path))

    def rm_file(self, path) -> None:
        client().delete_object(Bucket=self.bucket, Key=self._key(path))


def _exists(bucket: str, key: str) -> bool:
    try:
        client().head_object(Bucket=bucket, Key=key)
        return True
    except Exception as e:  # noqa: BLE001
        if error_code(e) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise explain(e, f"s3://{bucket}/{key}", "reading") from None


class S3StorageWriter(CommittingWriter):
    """DCP's file writer into ``step-N/<save_id>/``, committed by the marker (see the module doc).

    Build it with ``S3Store.writer(step, info)`` on every rank (the ranks agree on the save id)."""

    storage_kind = "dcp"

    def __init__(self, store: S3Store, step: int, save_id: str, info: Mapping[str, Any] | None = None, *,
                 checksums: bool = True, **writer_options: Any):
        self.store = store
        self.data_prefix = store.save_prefix(step, save_id)
        writer_options["sync_files"] = False  # an upload is durable once complete
        super().__init__(store.step_url(step), f"s3://{store.bucket}/{self.data_prefix}", step, info,
                         checksums=checksums, **writer_options)
        self.path = f"s3://{store.bucket}/{self.data_prefix}"
        self.fs = S3FileSystem(store.bucket, checksums)
        self.save_id = save_id
        # The step's marker version when this save began: the commit's condition (commit()).
        self.previous: str | None = store.marker_etag(step)

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None and str(checkpoint_id) not in (self.location, self.path):
            raise CheckpointError(f"this writer saves step {self.step} into {self.location}; it cannot also write "
                                  f"checkpoint_id={checkpoint_id}")

    def _prepare_staging(self) -> None:
        pass  # a fresh save id: nothing is there yet

    def _check_staging(self) -> None:
        pass

    def _hash_staged(self, name: str) -> tuple[int, str | None]:
        data = get_object(self.store.bucket, f"{self.data_prefix}/{name}")
        if data is None:
            raise CheckpointError(f"s3://{self.store.bucket}/{self.data_prefix}/{name}: missing after its upload")
        return len(data), xxhash.xxh3_128(data).hexdigest() if self.checksums else None

    def _write_metadata(self, metadata: Metadata, results: list) -> None:
        metadata.storage_data = {result.index: result.storage_data for result in results}
        metadata.storage_meta = self.storage_meta()
        data = pickle.dumps(metadata)
        with self.fs.create_stream(f"{self.path}/{METADATA_NAME}", "wb") as stream:
            stream.write(data)

    def _publish(self, manifest: bytes) -> None:
        put_bytes(self.store.bucket, f"{self.data_prefix}/{MANIFEST_NAME}", manifest)
        fault_point("during_publish")
        try:
            self.store.commit(self.step, self.save_id, manifest, previous=self.previous)
        except CheckpointError:
            self.store._delete_prefix(self.data_prefix + "/")  # refused: its objects are nobody's
            raise

    def _staging_text(self) -> str:
        return self.path

    @property
    def folder_text(self) -> str:
        return f"--checkpoint.folder {self.store.url}"

    def _free_space_path(self) -> str:
        return tempfile.gettempdir()


# --- reading ------------------------------------------------------------------------------------------

class S3StorageReader(StorageReader):
    """Reads one step (or a plain DCP prefix) with concurrent ranged GETs, checked like a local read.

    Before a byte of data is read: the marker (a committed step), the manifest against the
    marker's hash and this step and save, every item against its object's recorded size. With
    ``verify``, every object this rank reads whole is hashed as it arrives, the others
    separately; a mismatch names the object.
    """

    def __init__(self, store: S3Store, step: int | None, *, verify: bool = False, data_prefix: str | None = None):
        super().__init__()
        self.store = store
        self.step = step
        self.verify = verify
        self.data_prefix = data_prefix
        self.manifest: dict | None = None
        self.metadata: Metadata | None = None
        self.storage_data: dict = {}
        self.last_error: CheckpointError | None = None
        self.hash_wait_s = 0.0
        self.load_id = uuid.uuid4().hex
        self._verified: set[str] = set()

    @property
    def where(self) -> str:
        return f"s3://{self.store.bucket}/{self.data_prefix}" if self.data_prefix else self.store.step_url(self.step)

    def reset(self, checkpoint_id=None) -> None:
        self.load_id = uuid.uuid4().hex

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return str(checkpoint_id).lower().startswith("s3://")

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self.last_error is not None:
            raise self.last_error
        if self.metadata is not None:
            return self.metadata
        try:
            if self.data_prefix is None:
                save_id, self.manifest = self.store.committed_manifest(self.step)
                self.data_prefix = self.store.save_prefix(self.step, save_id)
            raw = self._get(METADATA_NAME, _MAX_METADATA_BYTES)
            if raw is None:
                raise CheckpointError(f"{self.where}/{METADATA_NAME} is missing: not a DCP checkpoint, or its save "
                                      "never finished")
            if self.manifest is not None:
                record = self.manifest["files"].get(METADATA_NAME) or {}
                problems = []
                if record.get("size") != len(raw):
                    problems.append(f"{self.where}/{METADATA_NAME}: {len(raw)} bytes, manifest says {record.get('size')}")
                elif self.verify and record.get("checksum") and xxhash.xxh3_128(raw).hexdigest() != record["checksum"]:
                    problems.append(f"{self.where}/{METADATA_NAME}: checksum mismatch")
                if problems:
                    raise corrupt_error(self.where, problems)
                self._verified.add(METADATA_NAME)
            metadata = accept_metadata(load_metadata_bytes(raw, f"{self.where}/{METADATA_NAME}"), self.manifest,
                                       self.where, f"{self.where}/{MANIFEST_NAME}", self.load_id)
        except CheckpointError as e:
            self.last_error = e
            raise
        self.metadata = metadata
        return metadata

    def _get(self, name: str, limit: int) -> bytes | None:
        return get_object(self.store.bucket, f"{self.data_prefix}/{name}", limit=limit)

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def _sizes(self, names: Iterable[str]) -> dict[str, int]:
        if self.manifest is not None:
            files = self.manifest["files"]
            return {name: files[name]["size"] for name in names if name in files}
        out = {}
        for name in names:
            with contextlib.suppress(Exception):
                out[name] = client().head_object(Bucket=self.store.bucket,
                                                 Key=f"{self.data_prefix}/{name}")["ContentLength"]
        return out

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        try:
            self._read(plan, planner)
        except CheckpointError as e:
            self.last_error = e
            raise
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read(self, plan: LoadPlan, planner: LoadPlanner) -> None:
        by_key: dict[tuple[str, int, int], list[ReadItem]] = {}
        for item in plan.items:
            info = self.storage_data[item.storage_index]
            by_key.setdefault((info.relative_path, info.offset, info.length), []).append(item)
        order = sorted(by_key)
        names = sorted({name for name, _, _ in order})
        sizes = self._sizes(names)
        problems = [f"{self.where}/{name}: not in the manifest" for name in names if name not in sizes]
        for name, offset, length in order:
            if name in sizes:
                problem = out_of_bounds(name, by_key[(name, offset, length)][0].storage_index.fqn, offset, length,
                                        sizes[name], f"{self.where}/{name}")
                if problem:
                    problems.append(problem)
        if problems:
            raise corrupt_error(self.where, list(dict.fromkeys(problems)))
        files = (self.manifest or {}).get("files") or {}
        hashing = {}
        if self.verify and self.manifest is not None:
            ranges: dict[str, list[tuple[int, int]]] = {}
            for name, offset, length in order:
                ranges.setdefault(name, []).append((offset, length))
            for name, spans in ranges.items():
                if name not in self._verified and tiles(spans, sizes.get(name)):
                    hashing[name] = xxhash.xxh3_128()
        rest = sorted(name for name in names if self.verify and self.manifest is not None and name not in hashing
                      and name not in self._verified)
        checker = transfer_pool().submit(self.store.check_objects, self.data_prefix, self.manifest, rest) \
            if rest else None
        fetches = _Fetches(self.store.bucket, self.data_prefix, order)
        places: list[concurrent.futures.Future] = []
        hash_queue: queue.Queue = queue.Queue()
        hasher = threading.Thread(target=_hash_in_order, args=(hash_queue, hashing), daemon=True) if hashing else None
        if hasher is not None:
            hasher.start()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="cairn-s3-place")
        read_error: BaseException | None = None
        try:
            for index, key in enumerate(order):
                name, _, length = key
                buffer = fetches.result(index)
                if name in hashing:
                    hash_queue.put((name, buffer))
                stored = BytesSlice(buffer, 0, length, f"{self.where}/{name}")
                items = by_key[key]
                if items[0].type == LoadItemType.BYTE_IO:
                    place_items(planner, items, stored)
                    fetches.consumed(index)
                else:
                    places.append(pool.submit(_place_then, planner, items, stored, fetches, index))
            for future in places:
                future.result()
        except BaseException as e:
            read_error = e
        finally:
            fetches.close()
            pool.shutdown(wait=True)
            start = time.perf_counter()
            if hasher is not None:
                hash_queue.put(None)
                hasher.join()
            self.hash_wait_s += time.perf_counter() - start
        problems = checker.result() if checker is not None else []
        for name, digest in hashing.items():
            expected = files.get(name, {}).get("checksum")
            if expected and digest.hexdigest() != expected:
                problems.append(f"{self.where}/{name}: checksum mismatch ({CHECKSUM_ALGORITHM} {digest.hexdigest()}, "
                                f"manifest says {expected}){holds(files.get(name, {}))}")
        if problems:
            raise corrupt_error(self.where, problems) from read_error
        if read_error is not None:
            if isinstance(read_error, CheckpointError):
                raise read_error
            raise CheckpointError(f"reading {self.where} failed: {type(read_error).__name__}: {read_error}") \
                from read_error
        self._verified |= set(hashing) | set(rest)


def _place_then(planner, items, stored, fetches, index) -> None:
    try:
        place_items(planner, items, stored)
    finally:
        fetches.consumed(index)


def _hash_in_order(work: queue.Queue, digests: dict) -> None:
    while (entry := work.get()) is not None:
        name, buffer = entry
        digests[name].update(buffer)


class _Fetches:
    """Downloads (file, offset, length) keys in order, at most ``READ_AHEAD_BYTES`` ahead of what
    was consumed (one span larger than that goes alone).

    Neighbouring keys of one file (the small items between two tensors, a run of small tensors)
    are read together as one span: up to a part (``CAIRN_S3_PART_MB``) and ``SPAN_GAP_BYTES``,
    and a small key (a record's header, a scalar) always joins its neighbour: a request costs a
    round trip, and some servers do a whole object's work for any range of it. Two large keys
    are never joined beyond a part; a span larger than that is read with concurrent ranged GETs
    of a part each."""

    def __init__(self, bucket: str, prefix: str, keys: list[tuple[str, int, int]]):
        self.bucket, self.prefix = bucket, prefix
        step = part_bytes()
        # spans: [file, start, end]; where[i]: (span index, offset of key i in its span)
        self._spans: list[list] = []
        self._where: list[tuple[int, int]] = []
        for name, offset, length in keys:
            last = self._spans[-1] if self._spans else None
            if (last is not None and last[0] == name and last[1] <= offset <= last[2] + SPAN_GAP_BYTES
                    and (max(last[2], offset + length) - last[1] <= step + SPAN_GAP_BYTES
                         or min(length, last[2] - last[1]) <= SPAN_GAP_BYTES)):  # a small key joins a large one
                last[2] = max(last[2], offset + length)
            else:
                self._spans.append([name, offset, offset + length])
            self._where.append((len(self._spans) - 1, offset - self._spans[-1][1]))
        self._lengths = [length for _, _, length in keys]
        self._users = [0] * len(self._spans)  # keys of each span not yet consumed
        for span, _ in self._where:
            self._users[span] += 1
        self._buffers: dict[int, bytearray | None] = {}  # None: a span read by one GET (its body)
        self._parts: dict[int, list[concurrent.futures.Future]] = {}
        self._next = 0
        self._ahead = 0
        self._lock = threading.Lock()
        self._closed = False
        self._fill()

    def _fill(self) -> None:
        with self._lock:
            step = part_bytes()
            while self._next < len(self._spans) and not self._closed:
                name, start, end = self._spans[self._next]
                length = end - start
                if self._ahead and self._ahead + length > READ_AHEAD_BYTES:
                    break
                key = f"{self.prefix}/{name}"
                if length <= step + SPAN_GAP_BYTES:
                    # One GET: its body is the buffer (no zeroed buffer to allocate, no second copy).
                    self._parts[self._next] = [transfer_pool().submit(get_range, self.bucket, key, start, length)]
                    self._buffers[self._next] = None
                else:
                    buffer = bytearray(length)
                    view = memoryview(buffer)
                    self._parts[self._next] = [
                        transfer_pool().submit(get_range, self.bucket, key, start + at, min(step, length - at),
                                               view[at:at + min(step, length - at)])
                        for at in range(0, length, step)]
                    self._buffers[self._next] = buffer
                self._ahead += length
                self._next += 1

    def result(self, index: int) -> memoryview:
        """Key ``index``'s bytes, once read."""
        span, at = self._where[index]
        self._fill()
        with self._lock:
            parts = self._parts[span]
        results = [part.result() for part in parts]
        buffer = self._buffers[span]
        if buffer is None:
            buffer = results[0] if results else b""
        return memoryview(buffer)[at:at + self._lengths[index]]

    def consumed(self, index: int) -> None:
        span, _ = self._where[index]
        with self._lock:
            self._users[span] -= 1
            if self._users[span] == 0:
                self._buffers.pop(span, None)
                self._parts.pop(span, None)
                self._ahead -= self._spans[span][2] - self._spans[span][1]
        self._fill()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            parts = [p for ps in self._parts.values() for p in ps]
        for part in parts:
            part.cancel()
        for part in parts:
            with contextlib.suppress(BaseException):
                part.result()


# --- the store ------------------------------------------------------------------------------------------

class S3Store:
    """Committed steps, commits, verification, deletes, the lease and transfers under ``s3://bucket/prefix``."""

    scheme = "s3"

    def __init__(self, bucket: str, prefix: str):
        self.bucket, self.prefix = bucket, prefix.strip("/")

    @classmethod
    def from_uri(cls, uri: str) -> S3Store:
        return cls(*parse_uri(uri))

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

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
        return f"s3://{self.bucket}/{self._key(step_name(step))}"

    # --- listing ---------------------------------------------------------------------------------

    def _list(self, prefix: str, delimiter: str | None = None) -> Iterator[dict]:
        """Every page of ListObjectsV2 under ``prefix`` (its contents and common prefixes)."""
        kwargs = {"Bucket": self.bucket, "Prefix": prefix}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        try:
            yield from client().get_paginator("list_objects_v2").paginate(**kwargs)
        except Exception as e:  # noqa: BLE001
            if isinstance(e, CheckpointError):
                raise
            raise explain(e, self.url, "listing") from None

    def _top(self) -> tuple[list[str], list[str]]:
        """(object names, folder names) directly under the prefix."""
        base = self._key("")
        names, folders = [], []
        for page in self._list(base, "/"):
            names += [item["Key"][len(base):] for item in page.get("Contents", [])]
            folders += [item["Prefix"][len(base):].rstrip("/") for item in page.get("CommonPrefixes", [])]
        return names, folders

    def exists(self) -> bool:
        for page in self._list(self._key("")):
            if page.get("KeyCount", 0):
                return True
        return False

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
        key = self.marker_key(step)
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
            raise corrupt_error(self.step_url(step), [f"s3://{self.bucket}/{key}: not the commit marker of step "
                                                      f"{step} (damaged, crafted, or another step's)"])
        return marker, etag

    def committed_manifest(self, step: int) -> tuple[str, dict]:
        """(save id, manifest) of committed step ``step``: the manifest checked against the marker."""
        found = self.read_marker(step)
        if found is None:
            raise CheckpointError(f"{self.step_url(step)} is not a committed step (no commit marker)")
        marker, _ = found
        where = f"s3://{self.bucket}/{self.save_prefix(step, marker['save_id'])}/{MANIFEST_NAME}"
        raw = get_object(self.bucket, f"{self.save_prefix(step, marker['save_id'])}/{MANIFEST_NAME}",
                         limit=MAX_MANIFEST_BYTES)
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
        try:
            return client().head_object(Bucket=self.bucket, Key=self.marker_key(step))["ETag"]
        except Exception as e:  # noqa: BLE001
            if error_code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise explain(e, f"s3://{self.bucket}/{self.marker_key(step)}", "reading") from None

    def commit(self, step: int, save_id: str, manifest: bytes, previous: str | None = None) -> None:
        """Put step ``step``'s marker, conditionally: only if the step is still what this save saw
        when it began (``previous``: the marker's version then, None: not committed). Two saves
        can never both commit from the same state; the one that comes second is refused."""
        marker = json.dumps({"format": MARKER_FORMAT, "step": step, "save_id": save_id,
                             "manifest_size": len(manifest), "manifest_xxh3": xxhash.xxh3_128(manifest).hexdigest(),
                             "committed_unix": round(time.time(), 3)}, sort_keys=True).encode()
        key = self.marker_key(step)
        replaced = self.read_marker(step) if previous is not None else None
        try:
            put_bytes(self.bucket, key, marker, **({"IfMatch": previous} if previous else {"IfNoneMatch": "*"}))
        except ClientError as e:
            if error_code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise CheckpointError(f"{self.step_url(step)} was committed by another save after this one began; "
                                      "this save was not committed (is another run writing into "
                                      f"{self.url}?)") from None
            raise explain(e, f"s3://{self.bucket}/{key}", "committing") from None
        if replaced is not None and replaced[0]["save_id"] != save_id:
            fault_point("during_replace")
            self._delete_prefix(self.save_prefix(step, replaced[0]["save_id"]) + "/")
            logger.info("replaced existing %s", self.step_url(step))

    # --- writing ---------------------------------------------------------------------------------

    def writer(self, step: int, info: Mapping[str, Any] | None = None, *, checksums: bool = True,
               process_group: dist.ProcessGroup | None = None, save_id: str | None = None,
               **writer_options: Any) -> S3StorageWriter:
        """A DCP StorageWriter committing step ``step`` here. Collective when a process group is
        initialized (the ranks agree on the save id over ``process_group``)."""
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        return S3StorageWriter(self, step, save_id or agreed_save_id(process_group), info, checksums=checksums,
                               **writer_options)

    def publish_dir(self, local: str | os.PathLike, step: int, info: Mapping[str, Any] | None = None, *,
                    storage: str | None = None, manifest: dict | None = None) -> str:
        """Upload a local folder of plain files as step ``step`` and commit it. With ``manifest`` (a
        local step's own), its records are kept and every file is checked against them while it
        uploads; else one is built from the hashes taken while uploading."""

        local = Path(local)
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
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001
                raise explain(e, f"s3://{self.bucket}/{prefix}/{name}", "uploading") from None
            if manifest is not None:
                record = manifest["files"].get(name)
                if record is None or record.get("size") != size or (record.get("checksum")
                                                                   and record["checksum"] != checksum):
                    problems.append(f"{local / name}: does not match its manifest (changed while it was uploaded?)")
            files[name] = {"size": size, "checksum": checksum}
        if problems:
            self._delete_prefix(prefix + "/")
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
        self.commit(step, save_id, data, previous=previous)
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

    def check_writable(self) -> None:
        key = self._key(f".cairn-write-probe-{uuid.uuid4().hex}")
        try:
            put_bytes(self.bucket, key, b"cairn")
            client().delete_object(Bucket=self.bucket, Key=key)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001
            raise explain(e, f"--checkpoint.folder {self.url}", "writing into") from None

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
        listed = {}
        for page in self._list(prefix + "/"):
            for item in page.get("Contents", []):
                listed[item["Key"][len(prefix) + 1:]] = item["Size"]
        problems, to_hash = [], []
        for name in names:
            record = files[name]
            uri = f"s3://{self.bucket}/{prefix}/{name}"
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
                problems.append(f"s3://{self.bucket}/{prefix}/{name}: checksum mismatch ({CHECKSUM_ALGORITHM} {digest}, "
                                f"manifest says {record['checksum']}){holds(record)}")
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
        if not problems and METADATA_NAME in manifest.get("files", {}):
            try:
                metadata = load_metadata_bytes(get_object(self.bucket, f"{prefix}/{METADATA_NAME}",
                                                          limit=_MAX_METADATA_BYTES) or b"",
                                               f"s3://{self.bucket}/{prefix}/{METADATA_NAME}")
            except CheckpointError as e:
                return list(getattr(e, "problems", None) or [str(e)])
            problems += check_identity(manifest, None, f"s3://{self.bucket}/{prefix}/{MANIFEST_NAME}",
                                       save_id_of(metadata))
            sizes = {name: record["size"] for name, record in manifest["files"].items()}
            for index, info in metadata.storage_data.items():
                if info.relative_path not in sizes:
                    problems.append(f"s3://{self.bucket}/{prefix}/{info.relative_path}: not in the manifest (DCP "
                                    "metadata points to it)")
                else:
                    problem = out_of_bounds(info.relative_path, index.fqn, info.offset, info.length,
                                            sizes[info.relative_path], f"s3://{self.bucket}/{prefix}/{info.relative_path}")
                    if problem:
                        problems.append(problem)
            problems += tensor_problems(metadata, f"s3://{self.bucket}/{prefix}/{METADATA_NAME}", manifest)
        if checksums and manifest.get("checksum_algorithm") is None and notes is not None:
            notes.append(f"{self.step_url(step)}: saved without checksums; sizes checked only")
        return list(dict.fromkeys(problems))

    # --- deleting --------------------------------------------------------------------------------

    def _delete_prefix(self, prefix: str) -> None:
        keys = [item["Key"] for page in self._list(prefix) for item in page.get("Contents", [])]
        for start in range(0, len(keys), 1000):
            batch = keys[start:start + 1000]
            try:
                client().delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in batch],
                                                                    "Quiet": True})
            except Exception as e:  # noqa: BLE001
                logger.warning("could not delete %d objects under s3://%s/%s (%s); the next run's start-up cleanup "
                               "will retry", len(batch), self.bucket, prefix, e)

    def delete(self, step: int, pacer=None) -> bool:
        """The marker first (the step is gone for every reader at once), then its objects."""
        try:
            client().delete_object(Bucket=self.bucket, Key=self.marker_key(step))
        except Exception as e:  # noqa: BLE001
            logger.warning("could not purge checkpoint %s: %s", self.step_url(step), explain(e, self.step_url(step),
                                                                                           "deleting"))
            return False
        fault_point("during_purge")
        self._delete_prefix(self._key(step_name(step)) + "/")
        if pacer is not None:
            pacer.pause()
        return True

    def purge(self, keep_latest_k: int, protect: Iterable[int] = (), pacer=None) -> list[int]:
        purged = [step for step in steps_to_purge(self.committed_steps(), keep_latest_k, protect)
                  if self.delete(step, pacer)]
        if purged:
            logger.info("purged checkpoints %s (keeping the newest %d)", purged, keep_latest_k)
        return purged

    def cleanup_incomplete(self, protect: Iterable[int] = (), background: bool = False) -> list[str]:
        """Remove what crashed saves left (call holding the lease): objects of saves no marker points
        to, and multipart uploads never completed. ``background``: on a thread of its own
        (``cleanup_thread``); a new save never meets them (its objects are under a new save id)."""
        if background:
            self.cleanup_thread = threading.Thread(target=self.cleanup_incomplete, args=(protect,),
                                                   name="cairn-cleanup", daemon=True)
            self.cleanup_thread.start()
            return []
        protect = set(protect)
        removed = []
        _, folders = self._top()
        for folder in folders:
            step = step_of(folder)
            if step is None or step in protect:
                continue
            marker = None
            with contextlib.suppress(CheckpointError):
                found = self.read_marker(step)
                marker = found[0] if found else None
            base = self._key(folder) + "/"
            save_ids = set()
            for page in self._list(base, "/"):
                save_ids |= {item["Prefix"][len(base):].rstrip("/") for item in page.get("CommonPrefixes", [])}
            for save_id in sorted(save_ids):
                if marker is not None and marker["save_id"] == save_id:
                    continue
                self._delete_prefix(base + save_id + "/")
                uri = f"s3://{self.bucket}/{base}{save_id}"
                logger.warning("removed %s (objects of a save that was never committed)", uri)
                removed.append(uri)
        try:
            uploads = client().list_multipart_uploads(Bucket=self.bucket, Prefix=self._key("")).get("Uploads", [])
        except Exception as e:  # noqa: BLE001
            uploads = []
            logger.warning("could not list unfinished uploads under %s: %s", self.url, e)
        for upload in uploads:
            with contextlib.suppress(Exception):
                client().abort_multipart_upload(Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                logger.warning("aborted an unfinished upload of s3://%s/%s", self.bucket, upload["Key"])
                removed.append(f"s3://{self.bucket}/{upload['Key']}")
        return removed

    # --- the lease (see lease.py) -------------------------------------------------------------------

    def _lease_key(self) -> str:
        return self._key(LEASE_NAME)

    def lease_read(self) -> tuple[dict, str] | None:
        got = get_small(self.bucket, self._lease_key())
        if got is None:
            return None
        raw, etag = got
        try:
            return json.loads(raw), etag
        except ValueError:
            raise CheckpointError(f"s3://{self.bucket}/{self._lease_key()}: not a cairn lease; if no run uses this "
                                  "folder, delete it") from None

    def _conditional_put(self, record: dict, **condition: str) -> str | None:
        try:
            return put_bytes(self.bucket, self._lease_key(), json.dumps(record).encode(), **condition)
        except ClientError as e:
            if error_code(e) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                return None
            raise explain(e, f"s3://{self.bucket}/{self._lease_key()}", "writing") from None

    def lease_create(self, record: dict) -> str | None:
        return self._conditional_put(record, IfNoneMatch="*")

    def lease_replace(self, record: dict, version: str) -> str | None:
        return self._conditional_put(record, IfMatch=version)

    def lease_delete(self, version: str) -> None:
        try:
            client().delete_object(Bucket=self.bucket, Key=self._lease_key(), IfMatch=version)
        except ClientError as e:
            if error_code(e) not in ("PreconditionFailed", "412", "404", "NoSuchKey"):
                raise


def agreed_save_id(process_group=None) -> str:
    """A fresh save id, the same on every rank (rank 0's, broadcast) when a process group is up."""
    save_id = new_save_id()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1:
        box = [save_id]
        dist.broadcast_object_list(box, src=dist.get_global_rank(process_group, 0) if process_group else 0,
                                   group=process_group)
        save_id = box[0]
    return save_id


def hash_object(bucket: str, key: str, size: int) -> str:
    """xxh3-128 of an object, streamed in ranged parts fetched concurrently and hashed in order."""
    digest = xxhash.xxh3_128()
    step = part_bytes()
    starts = list(range(0, size, step))
    window = max(2, min(8, connections()))
    pending: dict[int, concurrent.futures.Future] = {}
    for i, start in enumerate(starts):
        while len(pending) < window and i + len(pending) < len(starts):
            j = i + len(pending)
            pending[j] = transfer_pool().submit(get_range, bucket, key, starts[j], min(step, size - starts[j]))
        digest.update(pending.pop(i).result())
    return digest.hexdigest()


def download_files(bucket: str, prefix: str, manifest: Mapping[str, Any], target: Path) -> list[str]:
    """Every file of the manifest from ``prefix`` into ``target``, checked against it: problems."""
    problems = []

    def fetch(name: str, record: dict) -> str | None:
        path = target / name
        path.parent.mkdir(parents=True, exist_ok=True)
        size = record["size"]
        digest = xxhash.xxh3_128()
        with open(path, "wb") as f:
            step = part_bytes()
            for start in range(0, size, step):
                data = get_range(bucket, f"{prefix}/{name}", start, min(step, size - start))
                digest.update(data)
                f.write(data)
        if record.get("checksum") and digest.hexdigest() != record["checksum"]:
            return f"s3://{bucket}/{prefix}/{name}: checksum mismatch{holds(record)}"
        return None

    futures = [transfer_pool().submit(fetch, name, record) for name, record in (manifest.get("files") or {}).items()
               if relative_file_name(name)]
    for future in futures:
        try:
            problem = future.result()
        except CheckpointError as e:
            problem = str(e)
        if problem:
            problems.append(problem)
    return problems


def _committed_step_at(bucket: str, prefix: str) -> tuple[S3Store, int] | None:
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
    committed = _committed_step_at(bucket, prefix)
    if committed is not None:
        with committed[0].local_copy(committed[1]) as path:
            yield path
        return
    target = Path(tempfile.mkdtemp(prefix="cairn-download-"))
    try:
        store = S3Store(bucket, prefix)
        keys = [(item["Key"], item["Size"]) for page in store._list(prefix + "/" if prefix else "")
                for item in page.get("Contents", [])]
        if not keys and prefix and _exists(bucket, prefix):  # one object (a .pt file): as a local file
            path = target / name
            _download_to(bucket, prefix, client().head_object(Bucket=bucket, Key=prefix)["ContentLength"], path)
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
            futures.append(transfer_pool().submit(_download_to, bucket, key, size, path))
        for future in futures:
            future.result()
        yield target
    finally:
        shutil.rmtree(target, ignore_errors=True)


def _download_to(bucket: str, key: str, size: int, path: Path) -> None:
    with open(path, "wb") as f:
        step = part_bytes()
        for start in range(0, size, step):
            f.write(get_range(bucket, key, start, min(step, size - start)))


def step_store(uri: str, what: str) -> tuple[Any, Any]:
    """(store, step) for a DCP checkpoint at ``uri``: a committed cairn step (``.../step-N``), or
    a plain DCP prefix written by another tool (its ``.metadata`` under the prefix)."""
    bucket, prefix = parse_uri(uri)
    committed = _committed_step_at(bucket, prefix)
    if committed is not None:
        return committed
    store = S3Store(bucket, prefix)
    if not _exists(bucket, f"{prefix}/{METADATA_NAME}" if prefix else METADATA_NAME):
        raise CheckpointError(f"{what} {uri}: neither a committed cairn step nor a DCP checkpoint (no {METADATA_NAME})")
    return store, S3StorageReader(store, None, data_prefix=prefix)


def upload_path(local: Path, uri: str) -> int:
    """A local file (to the object ``uri``) or folder (under the prefix ``uri``); returns the bytes sent."""
    if local.is_dir():
        return upload_folder(local, uri)
    bucket, key = parse_uri(uri)
    if not key or _exists(bucket, key):
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
