"""S3Store against a real S3-compatible server on 127.0.0.1 (moto's server mode; tests/s3_server.py):
the marker commit, conditional puts, checksums, crashes, retention, throttling and a dropped
endpoint, the lease. The client under test is the one that talks to AWS S3 or MinIO."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import pickle
import signal
import threading

import pytest
import torch
import torch.distributed.checkpoint as dcp

from cairn.checkpoint import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError, load, save
from cairn.checkpoint import s3_reader
from cairn.checkpoint.lease import FolderBusyError, FolderLease, lease_state
from cairn.checkpoint.s3 import S3Store, parse_uri
from cairn.checkpoint.store import open_store
from s3_server import FaultProxy, s3  # noqa: F401 - s3 is a fixture
from test_storage import assert_same, make_state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def keys(s3, prefix: str = "") -> list[str]:
    pages = s3.client.get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def test_uri_parsing():
    assert parse_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_uri("s3://bucket") == ("bucket", "")
    with pytest.raises(CheckpointError, match="no bucket"):
        parse_uri("s3:///x")
    with pytest.raises(CheckpointError, match="unsupported storage scheme gs://"):
        open_store("gs://bucket/x")


def test_save_commit_and_load_round_trip(s3):
    store = open_store(s3.uri)
    assert isinstance(store, S3Store) and store.committed_steps() == []
    state = make_state(1)
    handle = save(state, store, 1, info={"kind": "full"})
    assert handle.result() == f"{s3.uri}/step-1"
    objects = keys(s3, "run/")
    assert "run/step-1.commit" in objects
    data_prefix = next(k for k in objects if k.endswith("/.metadata")).rsplit("/", 1)[0]
    assert {k.rsplit("/", 1)[1] for k in objects if k.startswith(data_prefix)} == {
        ".metadata", "__0_0.distcp", "cairn_manifest.json"}
    assert store.committed_steps() == [1] and store.verify(1) == []
    manifest = store.read_manifest(1)
    assert manifest["step"] == 1 and manifest["kind"] == "full" and manifest["save_id"] in data_prefix
    loaded = make_state(0)
    assert load(loaded, s3.uri).step == 1
    assert_same(loaded, state)


def test_large_objects_go_up_and_down_in_parts(s3, monkeypatch):
    monkeypatch.setenv("CAIRN_S3_PART_MB", "5")
    state = {"big": torch.randn(4 << 20), "small": torch.randn(3)}  # a 16 MiB tensor: four parts
    save(state, s3.uri, 2)
    upload = s3.client.head_object(Bucket=s3.bucket, Key=next(k for k in keys(s3) if k.endswith("__0_0.distcp")))
    assert "-" in upload["ETag"]  # a multipart upload's ETag
    loaded = {"big": torch.empty(4 << 20), "small": torch.empty(3)}
    with counted_gets() as gets:
        load(loaded, s3.uri)
    assert torch.equal(loaded["big"], state["big"]) and torch.equal(loaded["small"], state["small"])
    # 16 MiB with the records' headers and the small tensor next to it: four ranged GETs of <= 5 MiB
    assert len(data_gets(gets)) == 4 and max(length for _, length in data_gets(gets)) <= 5 << 20


def test_neighbouring_items_are_read_with_one_request(s3):
    """Each request is a round trip (and moto, like some servers, does a whole object's work for any
    range of it): 40 small tensors and a larger one come down in one GET, not 41."""
    state = {f"t{i}": torch.randn(1000) for i in range(40)} | {"w": torch.randn(1 << 18)}
    save(state, s3.uri, 1)
    loaded = {key: torch.empty_like(value) for key, value in state.items()}
    with counted_gets() as gets:
        load(loaded, s3.uri)
    assert all(torch.equal(loaded[key], state[key]) for key in state)
    assert len(data_gets(gets)) == 1


@contextlib.contextmanager
def counted_gets():
    """The (key, length) of every ranged GET the client makes meanwhile (the real ones)."""
    calls, real = [], s3_reader.get_range

    def counting(bucket, key, start, length, into=None):
        calls.append((key, length))
        return real(bucket, key, start, length, into)

    s3_reader.get_range = counting
    try:
        yield calls
    finally:
        s3_reader.get_range = real


def data_gets(calls: list[tuple[str, int]]) -> list[tuple[str, int]]:
    return [(key, length) for key, length in calls if key.endswith(".distcp")]


def _crash_child(uri: str, point: str, env: dict) -> None:
    os.environ.update(env)
    os.environ["CAIRN_FAULT"] = point
    store = open_store(uri)
    if point == "during_purge":
        store.purge(1)
    else:
        save(make_state(3), store, 3, info={"kind": "full"})
    os._exit(0)


@pytest.mark.parametrize("point", ["before_data", "during_upload", "after_data_before_commit", "during_publish",
                                   "during_purge"])
def test_a_crash_leaves_the_committed_steps_and_cleanup_removes_the_rest(s3, monkeypatch, point):
    if point == "during_upload":
        monkeypatch.setenv("CAIRN_S3_PART_MB", "5")
    store = open_store(s3.uri)
    saved = {step: make_state(step) for step in (1, 2)}
    for step, state in saved.items():
        save(state, store, step, info={"kind": "full"})
    env = {**s3.env, "CAIRN_S3_PART_MB": os.environ.get("CAIRN_S3_PART_MB", "64")}
    if point == "during_upload":  # a data object large enough for a multipart upload
        child = multiprocessing.get_context("fork").Process(target=_crash_big, args=(s3.uri, env))
    else:
        child = multiprocessing.get_context("fork").Process(target=_crash_child, args=(s3.uri, point, env))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    expected = [2] if point == "during_purge" else [1, 2]  # a purged step vanishes with its marker
    assert store.committed_steps() == expected
    for step in expected:
        loaded = make_state(0)
        load(loaded, store, step)
        assert_same(loaded, saved[step])
    removed = store.cleanup_incomplete()
    if point != "before_data":
        assert removed, point
    assert not [k for k in keys(s3, "run/step-3")], point
    if point == "during_purge":
        assert not keys(s3, "run/step-1/")


def _crash_big(uri: str, env: dict) -> None:
    os.environ.update(env)
    os.environ["CAIRN_FAULT"] = "during_upload"
    save({"big": torch.randn(3 << 20)}, open_store(uri), 3)
    os._exit(0)


def test_two_saves_never_both_commit_one_step(s3):
    store = open_store(s3.uri)
    save(make_state(1), store, 1)
    before = store.marker_etag(5)
    assert before is None
    first = store.writer(5, {"kind": "full"})
    second = store.writer(5, {"kind": "full"})
    # both began while step 5 did not exist; the first to commit wins, the second is refused
    dcp.save(make_state(5), storage_writer=first, no_dist=True)
    with pytest.raises(CheckpointError, match="committed by another save after this one began"):
        try:
            dcp.save(make_state(50), storage_writer=second, no_dist=True)
        except BaseException as e:  # DCP's wrapper
            raise second.last_error or e
    loaded = make_state(0)
    load(loaded, store, 5)
    assert_same(loaded, make_state(5))
    # a save that began after step 5 was committed replaces it, and the old objects go
    save(make_state(6), store, 5)
    load(loaded, store, 5)
    assert_same(loaded, make_state(6))
    assert len({k.split("/")[2] for k in keys(s3, "run/step-5/")}) == 1


def test_a_flipped_byte_is_named_by_verify_and_a_load(s3):
    store = open_store(s3.uri)
    save(make_state(1), store, 1)
    data = next(k for k in keys(s3) if k.endswith("__0_0.distcp"))
    raw = bytearray(s3.client.get_object(Bucket=s3.bucket, Key=data)["Body"].read())
    raw[len(raw) // 2] ^= 0xFF
    s3.client.put_object(Bucket=s3.bucket, Key=data, Body=bytes(raw))
    problems = store.verify(1)
    assert any("__0_0.distcp" in p and "checksum mismatch" in p for p in problems), problems
    with pytest.raises(CorruptCheckpointError, match="__0_0.distcp"):
        load(make_state(0), store, 1)
    # a truncated object is named by its size
    s3.client.put_object(Bucket=s3.bucket, Key=data, Body=bytes(raw[:100]))
    assert any("100 bytes, manifest says" in p for p in store.verify(1))


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_metadata_object_never_runs(s3, tmp_path):
    store = open_store(s3.uri)
    save(make_state(1), store, 1)
    metadata = next(k for k in keys(s3) if k.endswith("/.metadata"))
    marker = tmp_path / "pwned"
    s3.client.put_object(Bucket=s3.bucket, Key=metadata, Body=pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CorruptCheckpointError):  # the manifest's size and hash of .metadata do not match
        load(make_state(0), store, 1)
    with pytest.raises(CorruptCheckpointError):
        load(make_state(0), store, 1, verify=False)
    assert not marker.exists()


def test_throttling_and_a_dropped_endpoint_are_retried(s3, monkeypatch):
    proxy = FaultProxy(s3.url)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("CAIRN_S3_PART_MB", "5")
        store = open_store(s3.uri)
        state = {"big": torch.randn(3 << 20), "step": 4}
        proxy.slowdowns = 6  # the next six requests answer 503 SlowDown
        save(state, store, 4)
        assert proxy.injected == 6
        proxy.slowdowns = 4
        loaded = {"big": torch.empty(3 << 20), "step": 0}
        load(loaded, store, 4)
        assert torch.equal(loaded["big"], state["big"]) and loaded["step"] == 4
        # the endpoint goes away for 2 s mid-save (as during a restart): retried with backoff
        import time

        def outage() -> None:
            time.sleep(0.3)
            proxy.down_until = time.monotonic() + 2.0

        threading.Thread(target=outage).start()
        save({"big": torch.randn(6 << 20)}, store, 5)
        assert proxy.dropped > 0 and store.verify(5) == []
    finally:
        proxy.close()


def test_clear_errors_for_a_missing_bucket_and_no_credentials(s3, monkeypatch):
    store = open_store(f"s3://no-such-bucket-{os.getpid()}/run")
    with pytest.raises(CheckpointError, match="the bucket does not exist"):
        store.check_writable()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(CheckpointError, match="no AWS credentials found") as raised:
        open_store(s3.uri).check_writable()
    assert "cairn-test-secret" not in str(raised.value)


def test_the_lease_on_object_storage(s3):
    store = open_store(s3.uri)
    held = FolderLease.acquire(store)
    with pytest.raises(FolderBusyError, match="in use by another run"):
        FolderLease.acquire(store)
    held.release()
    assert store.lease_read()[0]["released"] is True  # released: a record that says so
    again = FolderLease.acquire(store)
    again.release()
    assert lease_state(store) is None


def test_retention_and_leftovers(s3):
    store = open_store(s3.uri)
    for step in (1, 2, 3):
        save(make_state(step), store, step)
    assert store.purge(1) == [1, 2]
    assert store.committed_steps() == [3] and not keys(s3, "run/step-1") and not keys(s3, "run/step-2")
    # objects of a save that never committed (its marker never written) are found and removed
    s3.client.put_object(Bucket=s3.bucket, Key="run/step-9/cairn-dead/__0_0.distcp", Body=b"x")
    upload = s3.client.create_multipart_upload(Bucket=s3.bucket, Key="run/step-9/cairn-dead/big")
    removed = store.cleanup_incomplete()
    assert any("cairn-dead" in r for r in removed) and not keys(s3, "run/step-9")
    assert not s3.client.list_multipart_uploads(Bucket=s3.bucket).get("Uploads")
    assert upload["UploadId"]


def test_a_marker_is_read_with_a_head_and_one_without_its_metadata_with_a_get(s3):
    """Small GETs cost a 40 ms delayed ACK on servers that send a small body after its headers (Ceph
    RGW's default): the marker's record is also user metadata, read by a HEAD; a marker without
    it (written by an older cairn) is read from its body."""
    store = open_store(s3.uri)
    state = make_state(1)
    save(state, store, 1)
    marker, _ = store.read_marker(1)
    key = "run/step-1.commit"
    assert json.loads(s3.client.head_object(Bucket=s3.bucket, Key=key)["Metadata"]["cairn-marker"]) == marker
    body = s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=body)  # as an older cairn wrote it
    assert store.read_marker(1)[0] == marker
    loaded = make_state(0)
    load(loaded, store, 1)
    assert_same(loaded, state)
