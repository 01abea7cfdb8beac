"""Writing to object storage: multipart uploads hashed on the way, and DCP's writer committed by a marker.

``S3UploadStream`` is a write-only stream to one object: parts of ``part_bytes()``
(``CAIRN_S3_PART_MB``, default 64 MiB) go up concurrently as a multipart upload, hashed as
they leave; ``close`` completes it. ``S3StorageWriter`` is DCP's file writer over such
streams, writing a step's objects under a save id of its own (``step-N/<save_id>/``); its
``finish`` writes the manifest and then has the store put the commit marker (``s3.S3Store.commit``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import logging
import pickle
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import xxhash
from torch.distributed.checkpoint.filesystem import FileSystemBase
from torch.distributed.checkpoint.metadata import Metadata

from cairn.checkpoint.errors import CheckpointError
from cairn.checkpoint.faults import fault_point
from cairn.checkpoint.layout import MANIFEST_NAME, METADATA_NAME
from cairn.checkpoint.s3_client import (
    client,
    delete_key,
    exists,
    get_object,
    parse_uri,
    part_bytes,
    put_bytes,
    request,
    s3_uri,
    transfer_pool,
)
from cairn.checkpoint.writer import CommittingWriter, HashingStream

logger = logging.getLogger("cairn")


class S3UploadStream(HashingStream):
    """A write-only stream to one object: parts of ``part_bytes()`` go up concurrently as a multipart
    upload (at most ``in_flight`` at once per stream), hashed on the way; ``close`` completes it."""

    def __init__(self, bucket: str, key: str, *, hashing: bool, rank: int | None = None, in_flight: int = 4,
                 fault_upload: bool = True):
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
        self._fault_upload = fault_upload  # the during_upload fault point, after the first part

    @property
    def uri(self) -> str:
        return s3_uri(self.bucket, self.key)

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
            self._upload_id = request("starting the upload of", self.uri, lambda: client().create_multipart_upload(
                Bucket=self.bucket, Key=self.key)["UploadId"])
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
            etag = request(f"uploading part {number} of", self.uri, lambda: client().upload_part(
                Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, PartNumber=number, Body=data)["ETag"])
            return {"PartNumber": number, "ETag": etag}
        except BaseException as e:
            self._failed = e
            raise
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
                put_bytes(self.bucket, self.key, bytes(self._buffer[:self._filled]))
                return
            if self._filled:
                self._send_part()
            parts = [future.result() for future in self._parts]
            request("completing the upload of", self.uri, lambda: client().complete_multipart_upload(
                Bucket=self.bucket, Key=self.key, UploadId=self._upload_id, MultipartUpload={"Parts": parts}))
        except BaseException:
            self.abort()
            raise
        finally:
            self._buffer, self._spare = bytearray(), []

    def abort(self) -> None:
        """Give the upload up (its parts are dropped by the store); best effort: a crash's upload
        is found by ``cleanup_incomplete`` and ``cairn checkpoint clean``."""
        if self._upload_id is not None:
            for future in self._parts:
                with contextlib.suppress(BaseException):
                    future.result()
            with contextlib.suppress(Exception):
                client().abort_multipart_upload(Bucket=self.bucket, Key=self.key, UploadId=self._upload_id)
            self._upload_id = None


def upload_file(path: Path, bucket: str, key: str) -> tuple[int, str]:
    """Upload a local file (multipart when large), hashing it on the way: (size, xxh3-128)."""
    stream = S3UploadStream(bucket, key, hashing=True, fault_upload=False)
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
        return parse_uri(str(path))[1]

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
        request("copying", str(path), lambda: client().copy_object(
            Bucket=self.bucket, Key=target, CopySource={"Bucket": self.bucket, "Key": source}))
        delete_key(self.bucket, source)

    def mkdir(self, path) -> None:
        pass  # prefixes are not made

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return str(checkpoint_id).lower().startswith("s3://")

    def exists(self, path) -> bool:
        return exists(self.bucket, self._key(path))

    def rm_file(self, path) -> None:
        delete_key(self.bucket, self._key(path))


class S3StorageWriter(CommittingWriter):
    """DCP's file writer into ``step-N/<save_id>/``, committed by the marker (see the module doc).

    Build it with ``S3Store.writer(step, info)`` on every rank (the ranks agree on the save id).
    ``store`` is the ``s3.S3Store`` the step goes to."""

    storage_kind = "dcp"

    def __init__(self, store, step: int, save_id: str, info: Mapping[str, Any] | None = None, *,
                 checksums: bool = True, **writer_options: Any):
        self.store = store
        self.data_prefix = store.save_prefix(step, save_id)
        writer_options["sync_files"] = False  # an upload is durable once complete
        super().__init__(store.step_url(step), s3_uri(store.bucket, self.data_prefix), step, info,
                         checksums=checksums, **writer_options)
        self.path = s3_uri(store.bucket, self.data_prefix)
        self.fs = S3FileSystem(store.bucket, checksums)
        self.save_id = save_id
        # The step's marker version when this save began: the commit's condition (commit()).
        self.previous: str | None = store.marker_etag(step)

    def reset(self, checkpoint_id=None) -> None:
        if checkpoint_id is not None and str(checkpoint_id) not in (self.location, self.path):
            raise CheckpointError(f"this writer saves step {self.step} into {self.location}; it cannot also write "
                                  f"checkpoint_id={checkpoint_id}")

    def _prepare_staging(self) -> None:
        # A fresh save id: nothing is there yet. The store must honour the conditions the commit
        # relies on: found out here, on the coordinator, before any rank writes a byte.
        self.store.check_conditional_writes()

    def _check_staging(self) -> None:
        pass

    def _hash_staged(self, name: str) -> tuple[int, str | None]:
        data = get_object(self.store.bucket, f"{self.data_prefix}/{name}")
        if data is None:
            raise CheckpointError(f"{self.path}/{name}: missing after its upload")
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
            self._fence()
            self.store.commit(self.step, self.save_id, manifest, previous=self.previous)
        except CheckpointError:
            self.store.delete_prefix(self.data_prefix + "/")  # refused: its objects are nobody's
            raise

    def _staging_text(self) -> str:
        return self.path

    @property
    def folder_text(self) -> str:
        return f"--checkpoint.folder {self.store.url}"

    def _free_space_path(self) -> str:
        return tempfile.gettempdir()
