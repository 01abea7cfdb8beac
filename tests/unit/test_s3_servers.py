"""The object store as the servers people run implement it, probed rather than assumed: moto
(AWS S3's behaviour), Ceph RGW 16 (If-Match takes an unquoted ETag, DELETE ignores If-Match;
``CAIRN_TEST_RGW_ENDPOINT``, started by ``.ci/run``), and a store that ignores conditional
writes (a proxy in front of moto that drops the headers). Each test runs on each real server:
the capability probe, the lease's heartbeat and take-over, replacing a committed step, the
commit fence, refusal of an unprotected store, and storage errors as one line within the bound."""

from __future__ import annotations

import time

import pytest
import torch.distributed.checkpoint as dcp

from cairn.checkpoint import CheckpointError, load, save
from cairn.checkpoint.lease import FolderBusyError, FolderLease, LeaseLostError, lease_state
from cairn.checkpoint.s3_conditions import UnprotectedStoreError, conditions_of, probe
from cairn.checkpoint.store import open_store
from rgw_server import rgw  # noqa: F401 - a fixture
from s3_server import FaultProxy, NotS3Server, closed_port_url, s3  # noqa: F401 - a fixture
from test_storage import assert_same, make_state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(params=["moto", "rgw"])
def server(request):
    """A fresh bucket on each real S3 implementation of the suite."""
    return request.getfixturevalue("s3" if request.param == "moto" else "rgw")


def objects(server, prefix: str = "") -> list[str]:
    pages = server.client.get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def test_the_probe_finds_what_each_server_does_and_leaves_nothing(server, request):
    found = probe(server.bucket, "run")
    assert found.create
    if "rgw" in request.node.callspec.id:
        assert found.match_form == "unquoted" and not found.delete  # RGW 16.2
    else:
        assert found.match_form == "quoted" and found.delete  # S3's behaviour
    assert objects(server) == []


def test_the_lease_beats_and_is_taken_over_and_released(server, monkeypatch):
    """The failure seen on RGW: its first heartbeat (a quoted If-Match) was refused, the run took its
    own lease for another run's, and a stale lease could never be taken over."""
    monkeypatch.setenv("CAIRN_LEASE_HEARTBEAT", "0.1")
    store = open_store(server.uri)
    held = FolderLease.acquire(store)
    first = store.lease_read()[0]["heartbeat"]
    time.sleep(0.6)
    assert held.lost is None and store.lease_read()[0]["heartbeat"] > first
    held.confirm()  # the commit fence: still this run's
    with pytest.raises(FolderBusyError, match="in use by another run"):
        FolderLease.acquire(store)
    held.release()
    assert lease_state(store) is None and store.lease_read()[0]["released"]
    # a run on another node died: once its lease has not been renewed for the timeout (the
    # server's clock: LastModified against Date), it is taken over (an If-Match on its ETag)
    monkeypatch.setenv("CAIRN_LEASE_TIMEOUT", "1")
    store.lease_replace({"host": "node-7", "pid": 4242, "token": "dead-run", "started": "2026-01-01T00:00:00+00:00",
                         "heartbeat": time.time() + 86400}, store.lease_read()[1])
    time.sleep(2.2)  # LastModified has whole seconds
    taker = FolderLease.acquire(store)
    assert store.lease_read()[0]["token"] == taker.token
    taker.release()
    assert lease_state(store) is None


def test_a_committed_step_is_replaced(server):
    """Replacing a step (load_step to an earlier step, fallback_on_corrupt, upload_to again) puts the
    marker with If-Match in the form the server takes."""
    store = open_store(server.uri)
    save(make_state(1), store, 5)
    save(make_state(2), store, 5)
    loaded = make_state(0)
    load(loaded, store, 5)
    assert_same(loaded, make_state(2))
    assert len({key.split("/")[2] for key in objects(server, "run/step-5/")}) == 1  # the old save's objects went
    writer = store.writer(5)  # began while step 5 was make_state(2)...
    save(make_state(3), store, 5)  # ...which another save replaced first
    with pytest.raises(CheckpointError, match="committed by another save after this one began"):
        try:
            dcp.save(make_state(4), storage_writer=writer, no_dist=True)
        except BaseException as e:
            raise writer.last_error or e
    load(loaded, store, 5)
    assert_same(loaded, make_state(3))


def test_a_run_that_lost_its_folder_commits_nothing_there(server, tmp_path):
    """The fence: a commit confirms the lease right before it publishes (both kinds of store)."""
    for store in (open_store(server.uri), open_store(tmp_path / "local")):
        held = FolderLease.acquire(store)
        store.set_fence(held.confirm)
        save(make_state(1), store, 1)
        record, version = store.lease_read()
        store.lease_replace({**record, "token": "another-run", "pid": 1}, version)  # taken over meanwhile
        with pytest.raises(LeaseLostError, match="this save was not committed"):
            save(make_state(2), store, 2)
        assert store.committed_steps() == [1]
        with pytest.raises(LeaseLostError):
            with store.staged_dir(3) as staging:  # an HF export's commit is fenced too
                (staging / "model.safetensors").write_bytes(b"x")
        assert store.committed_steps() == [1]
        held.release()
        assert store.lease_read()[0]["token"] == "another-run"  # a lost lease is not removed by its old holder
    assert [key for key in objects(server) if "/step-2/" in key or "/step-3/" in key] == []


def test_a_store_that_ignores_conditional_writes_is_refused(s3, monkeypatch):
    proxy = FaultProxy(s3.url, strip_conditions=True)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        assert conditions_of(s3.bucket, "run").lacks() == ["create-if-absent (If-None-Match: * on PUT)",
                                                           "replace-if-match (If-Match on PUT)"]
        store = open_store(s3.uri)
        with pytest.raises(UnprotectedStoreError) as refused:
            store.check_writable()
        message = str(refused.value)
        assert "\n" not in message and "create-if-absent" in message
        assert "--checkpoint.s3_unsafe_no_conditional_writes" in message
        with pytest.raises(UnprotectedStoreError):  # the library's save is refused before it writes a byte
            save(make_state(1), store, 1)
        assert objects(s3) == []
        unprotected = open_store(s3.uri, s3_unsafe_no_conditional_writes=True)
        held = FolderLease.acquire(unprotected)
        with pytest.raises(FolderBusyError):  # emulated by reading first: a race could still slip through
            FolderLease.acquire(unprotected)
        save(make_state(1), unprotected, 1)
        save(make_state(2), unprotected, 1)  # replaced
        loaded = make_state(0)
        load(loaded, unprotected, 1)
        assert_same(loaded, make_state(2))
        held.release()
        assert lease_state(unprotected) is None
    finally:
        proxy.close()


# --- errors: one line naming the URI and the cause, within the stated bound -----------------------

def test_storage_errors_are_one_line_within_the_bound(s3, monkeypatch):
    monkeypatch.setenv("CAIRN_S3_RETRY_S", "2")
    # the endpoint is down: nothing listens there (retried for 2 s, then one line)
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed_port_url())
    start = time.monotonic()
    with pytest.raises(CheckpointError) as down:
        open_store(s3.uri).check_writable()
    elapsed = time.monotonic() - start
    assert 1.0 < elapsed < 2 + 5, elapsed  # the bound: CAIRN_S3_RETRY_S and one connect timeout at most
    message = str(down.value)
    assert "\n" not in message and s3.uri in message and "connection refused" in message
    assert "gave up after" in message
    # the wrong port: a server that is not S3 answers (not retried: it will not become S3)
    other = NotS3Server()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", other.url)
        with pytest.raises(CheckpointError, match="did not answer as an S3 server") as wrong:
            open_store(s3.uri).committed_steps()
        assert "gave up after" not in str(wrong.value)  # at once: no retry makes it an S3 server
        assert "\n" not in str(wrong.value) and s3.uri in str(wrong.value)
    finally:
        other.close()


def test_a_store_lost_mid_run_is_one_line_on_every_path(s3, monkeypatch, caplog):
    """Saves, loads, listing and the lease's renewal, once the endpoint stops answering mid-run."""
    monkeypatch.setenv("CAIRN_S3_RETRY_S", "1")
    monkeypatch.setenv("CAIRN_LEASE_HEARTBEAT", "0.2")
    proxy = FaultProxy(s3.url)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        store = open_store(s3.uri)
        held = FolderLease.acquire(store)
        save(make_state(1), store, 1)
        proxy.down_until = time.monotonic() + 3600  # every connection dropped from now on
        for attempt in (lambda: save(make_state(2), store, 2), lambda: load(make_state(0), store, 1),
                        store.committed_steps, held.confirm):
            with pytest.raises(CheckpointError) as failed:
                attempt()
            message = str(failed.value)
            assert "\n" not in message and s3.uri in message and "broke" in message, message
        time.sleep(1.5)
        renewals = [r.getMessage() for r in caplog.records if "could not renew the lease" in r.getMessage()]
        assert renewals and all("\n" not in line and s3.uri in line for line in renewals)
        held.release()
    finally:
        proxy.close()


@pytest.mark.parametrize("uri", ["s3:/bucket/run", "s3:bucket/run", "S3:/bucket", "s3://", "s3:///run",
                                 "s3://b/run", "s3://bucket with space/run", "gs://bucket/run"])
def test_malformed_uris_are_one_line(uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as refused:
        open_store(uri)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(uri) and ("s3://bucket/prefix" in message
                                                                or "bucket name" in message)
    assert list(tmp_path.iterdir()) == []  # never a local folder named after it
