"""Reading from object storage: DCP's reader over concurrent ranged GETs, and whole objects down.

``S3StorageReader`` reads one committed step (or a plain DCP prefix): the marker, the manifest
against the marker's hash, every item against its object's recorded size, then the data with
concurrent ranged GETs (``Fetches``: neighbouring small items in one request, a large one in
parts of ``CAIRN_S3_PART_MB``), hashed as it arrives with ``verify``. ``hash_object``,
``download_files`` and ``download_to`` move whole objects (verify, local copies, exports).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import xxhash
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from cairn.checkpoint.dcp_metadata import load_metadata_bytes, out_of_bounds
from cairn.checkpoint.errors import CheckpointError, corrupt_error
from cairn.checkpoint.layout import MANIFEST_NAME, METADATA_NAME
from cairn.checkpoint.manifest import CHECKSUM_ALGORITHM, holds, relative_file_name
from cairn.checkpoint.reader import BytesSlice, accept_metadata, place_items, tiles
from cairn.checkpoint.s3_client import connections, get_object, get_range, head, part_bytes, s3_uri, transfer_pool

READ_AHEAD_BYTES = 1 << 30  # bytes of items downloaded ahead of placing them, per rank
SPAN_GAP_BYTES = 1 << 20  # bytes between two keys of a file that one GET reads through rather than ask twice
MAX_METADATA_BYTES = 2 << 30


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
        """Where the objects are (a committed step's save prefix, once known)."""
        return s3_uri(self.store.bucket, self.data_prefix) if self.data_prefix else self.store.step_url(self.step)

    @property
    def checkpoint_text(self) -> str:
        """The checkpoint as the user names it (``cairn checkpoint verify`` takes it): a step's URL,
        not its save prefix."""
        return self.store.step_url(self.step) if self.step is not None else self.where

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
                # The marker names the save; its manifest and DCP metadata then come at once (two
                # round trips in all before the data, where small objects cost their round trip).
                save_id, marker = self.store.committed_save_id(self.step)
                self.data_prefix = self.store.save_prefix(self.step, save_id)
                fetching = transfer_pool().submit(self._get, METADATA_NAME, MAX_METADATA_BYTES)
                try:
                    _, self.manifest = self.store.committed_manifest(self.step, marker)
                except BaseException:
                    fetching.cancel()
                    raise
                raw = fetching.result()
            else:
                raw = self._get(METADATA_NAME, MAX_METADATA_BYTES)
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
                    raise corrupt_error(self.checkpoint_text, problems)
                self._verified.add(METADATA_NAME)
            metadata = accept_metadata(load_metadata_bytes(raw, f"{self.where}/{METADATA_NAME}"), self.manifest,
                                       self.checkpoint_text, f"{self.where}/{MANIFEST_NAME}", self.load_id)
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
            found = head(self.store.bucket, f"{self.data_prefix}/{name}")
            if found is not None:
                out[name] = found["ContentLength"]
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
            raise corrupt_error(self.checkpoint_text, list(dict.fromkeys(problems)))
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
        fetches = Fetches(self.store.bucket, self.data_prefix, order)
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
            raise corrupt_error(self.checkpoint_text, problems) from read_error
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


class Fetches:
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


def download_to(bucket: str, key: str, size: int, path: Path) -> None:
    with open(path, "wb") as f:
        step = part_bytes()
        for start in range(0, size, step):
            f.write(get_range(bucket, key, start, min(step, size - start)))


