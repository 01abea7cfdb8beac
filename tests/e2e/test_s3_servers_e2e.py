"""Training against the S3 servers people run, as a user meets them (issue #24).

On Ceph RGW (``CAIRN_TEST_RGW_ENDPOINT``; ``.ci/run`` starts it): a run long enough for many
lease heartbeats with saves every few steps, a second run on its folder refused, kill -9
mid-upload and at the commit point with the same command resuming bit for bit each time,
``cairn checkpoint clean`` removing what the kill left and nothing else, and committed steps
replaced by ``fallback_on_corrupt`` and by ``upload_to``. On a store that ignores conditional
writes: refused at start in one line, nothing written. An endpoint that is down, a wrong
port and a malformed ``s3:`` URI: one line each, within the retry bound."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from cairn.cli import main
from conftest import REPO, kill_tree, start, train
from rgw_server import rgw  # noqa: F401 - a fixture
from s3_server import FaultProxy, NotS3Server, closed_port_url, s3  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow

CKPT = ["--checkpoint.enable", "--checkpoint.no-last_save_model_only", "--checkpoint.when_busy", "wait"]


def committed(uri: str, capsys) -> list[int]:
    capsys.readouterr()
    assert main(["checkpoint", "ls", uri, "--json"]) == 0
    return sorted(row["step"] for row in json.loads(capsys.readouterr().out)["steps"] if row["committed"])


def keys(server) -> set[str]:
    pages = server.client.get_paginator("list_objects_v2").paginate(Bucket=server.bucket)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def uploads(server) -> list[str]:
    return [upload["Key"] for upload in server.client.list_multipart_uploads(Bucket=server.bucket).get("Uploads", [])]


def cairn_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "cairn.train:" in line]


def worker_traceback(output: str) -> bool:
    """Whether the training process printed a traceback (torchrun's own report of the exit code aside)."""
    return any('File "' in line and ("/cairn/" in line or "botocore" in line) for line in output.splitlines())


def wait_for_manifests(server, prefix: str, count: int, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until ``count`` saves under ``prefix`` have written their manifest."""
    deadline = time.monotonic() + timeout
    while sum(key.startswith(prefix) and key.endswith("/cairn_manifest.json") for key in keys(server)) < count:
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, f"{count} manifests not written under {prefix} in {timeout} s"
        time.sleep(0.2)


def test_rgw_kills_resume_bitwise_and_clean_removes_only_the_leftovers(rgw, tmp_path, capsys):
    # Heartbeats every second: every run here crosses several (RGW refused the first one, issue #24).
    env = {**rgw.env, "CAIRN_LEASE_HEARTBEAT": "1", "CAIRN_S3_PART_MB": "5"}  # 7 MB of state: multipart uploads
    common = [*CKPT, "--checkpoint.interval", "2", "--training.steps", "8", "--checkpoint.keep_latest_k", "0"]
    whole_uri, split_uri = f"{rgw.uri}/whole", f"{rgw.uri}/split"
    whole = train(tmp_path / "whole", *common, "--checkpoint.folder", whole_uri, env=env)
    assert "was taken by" not in whole.output and "could not renew" not in whole.output

    # 1. A run stops at the commit point of step 6 (manifest written, marker not) and stays there,
    # heartbeating; a second run on its folder is refused; then the first is killed -9 there.
    holder = start(tmp_path / "split", *common, "--checkpoint.folder", split_uri,
                   env={**env, "CAIRN_FAULT": "during_publish:sleep=300", "CAIRN_FAULT_SKIP": "2"})
    try:
        wait_for_manifests(rgw, "run/split/", 3, holder)  # step 6's: the run is at its commit point
        second = train(tmp_path / "second", *common, "--checkpoint.folder", split_uri, env=env, check=False)
        assert second.returncode != 0 and "is in use by another run" in second.output
        assert len(cairn_lines(second.output)) == 1 and not worker_traceback(second.output)
        assert holder.poll() is None
    finally:
        output = kill_tree(holder)
    assert "was taken by" not in output and "could not renew" not in output
    assert committed(split_uri, capsys) == [2, 4]

    # 2. The same command takes the dead run's folder over, removes what it left, resumes from step 4,
    # and is killed -9 mid-upload of step 8.
    killed = train(tmp_path / "split", *common, "--checkpoint.folder", split_uri, check=False,
                   env={**env, "CAIRN_FAULT": "during_upload", "CAIRN_FAULT_SKIP": "1"})
    assert killed.returncode != 0 and "CAIRN_FAULT=during_upload" in killed.output
    assert "took over the lease" in killed.output and f"loaded full checkpoint {split_uri}/step-4" in killed.output
    assert f"removed {split_uri}/step-6/" in killed.output  # the first kill's objects
    steps = committed(split_uri, capsys)
    assert steps == [2, 4, 6] and uploads(rgw)

    # 3. ls and a dry run show what the kill left; clean --yes, as printed, removes that and nothing else.
    assert main(["checkpoint", "ls", split_uri]) == 0
    listing = " ".join(capsys.readouterr().out.split())  # as one line: the output wraps at 80 columns
    assert "stale (its process" in listing and "a multipart upload never completed" in listing
    before = keys(rgw)
    assert main(["checkpoint", "clean", split_uri]) == 0
    dry = capsys.readouterr().out
    assert "would take over the stale lease and remove 1 leftover" in " ".join(dry.split())
    assert keys(rgw) == before and uploads(rgw)
    hint = dry.strip().splitlines()[-1].split()
    assert hint == ["cairn", "checkpoint", "clean", split_uri, "--yes"]
    assert main(hint[1:]) == 0
    assert "removed 1 leftover" in capsys.readouterr().out
    assert not uploads(rgw) and keys(rgw) == before  # the lease object stays: a record that says released
    assert committed(split_uri, capsys) == steps and main(["checkpoint", "verify", split_uri]) == 0

    # 4. The same command again: resumed from step 6, bit for bit as the run never killed.
    resumed = train(tmp_path / "split", *common, "--checkpoint.folder", split_uri, env=env)
    assert f"loaded full checkpoint {split_uri}/step-6" in resumed.output
    for step in range(1, 9):
        assert resumed.losses[step] == whole.losses[step], step
    assert committed(split_uri, capsys) == [2, 4, 6, 8]


def _flip_a_byte(server, prefix: str) -> None:
    key = next(k for k in sorted(keys(server)) if k.startswith(prefix) and k.endswith("__0_0.distcp"))
    raw = bytearray(server.client.get_object(Bucket=server.bucket, Key=key)["Body"].read())
    raw[len(raw) // 2] ^= 0xFF
    server.client.put_object(Bucket=server.bucket, Key=key, Body=bytes(raw))


def test_rgw_steps_replaced_by_fallback_on_corrupt_and_by_upload_to(rgw, tmp_path, capsys):
    common = [*CKPT, "--checkpoint.interval", "4", "--training.steps", "8"]
    uri = f"{rgw.uri}/fallback"
    first = train(tmp_path / "a", *common, "--checkpoint.folder", uri, env=rgw.env)
    _flip_a_byte(rgw, "run/fallback/step-8/")  # (the error without the flag: tests/unit/test_clean.py)
    again = train(tmp_path / "a", *common, "--checkpoint.folder", uri, "--checkpoint.fallback_on_corrupt",
                  env=rgw.env)
    assert "falling back to step-4" in again.output and f"replaced existing {uri}/step-8" in again.output
    assert main(["checkpoint", "verify", f"{uri}/step-8"]) == 0
    assert again.losses[8] == first.losses[8]

    mirror = f"{rgw.uri}/mirror"
    mirrored = [*common, "--checkpoint.upload_to", mirror]
    train(tmp_path / "b", *mirrored, env=rgw.env)
    assert committed(mirror, capsys) == [4, 8]
    again = train(tmp_path / "b", *mirrored, "--checkpoint.load_step", "4", env=rgw.env)
    assert "upload to" not in again.output.replace("uploaded to", "")  # no failed upload
    assert again.output.count("uploaded to") == 1 and f"replaced existing {mirror}/step-8" in again.output
    assert main(["checkpoint", "verify", f"{mirror}/step-8"]) == 0
    assert main(["checkpoint", "diff", str(tmp_path / "b" / "checkpoint" / "step-8"), f"{mirror}/step-8"]) == 0


def test_a_store_that_ignores_conditional_writes_is_refused_at_start(s3, tmp_path):
    proxy = FaultProxy(s3.url, strip_conditions=True)
    try:
        result = train(tmp_path, *CKPT, "--training.steps", "2", "--checkpoint.folder", s3.uri, check=False,
                       env={**s3.env, "AWS_ENDPOINT_URL": proxy.url})
    finally:
        proxy.close()
    lines = cairn_lines(result.output)
    assert result.returncode != 0 and len(lines) == 1, result.output[-3000:]
    assert "does not honour create-if-absent (If-None-Match: * on PUT)" in lines[0]
    assert "--checkpoint.s3_unsafe_no_conditional_writes" in lines[0] and not worker_traceback(result.output)
    assert keys(s3) == set()  # nothing written: the probe removed its object, no lease was taken


def test_endpoint_down_wrong_port_and_malformed_uris_are_one_line(s3, tmp_path, capsys, monkeypatch):
    bound = 3  # CAIRN_S3_RETRY_S: retried this long, then one line
    env = {**s3.env, "AWS_ENDPOINT_URL": closed_port_url(), "CAIRN_S3_RETRY_S": str(bound)}
    begun = time.monotonic()
    result = train(tmp_path / "down", *CKPT, "--training.steps", "2", "--checkpoint.folder", s3.uri, env=env,
                   check=False)
    lines = cairn_lines(result.output)
    assert result.returncode != 0 and len(lines) == 1 and s3.uri in lines[0], result.output[-3000:]
    assert "connection refused (gave up after" in lines[0] and "botocore" not in result.output
    assert not worker_traceback(result.output) and time.monotonic() - begun < bound + 120  # start-up included
    # the wrong port: another server answers there (a command of the CLI, in one line, at once)
    other = NotS3Server()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", other.url)
        capsys.readouterr()
        assert main(["checkpoint", "ls", s3.uri]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "did not answer as an S3 server (HTTP 404)" in err[0] and s3.uri in err[0]
    finally:
        other.close()
    # one slash: refused, never a local folder named "s3:" (the other forms: tests/unit/test_s3_servers.py)
    result = train(tmp_path / "typo", *CKPT, "--training.steps", "2", "--checkpoint.folder", "s3:/bucket/run",
                   check=False)
    lines = cairn_lines(result.output)
    assert result.returncode != 0 and len(lines) == 1 and "expected s3://bucket/prefix" in lines[0]
    assert not (tmp_path / "typo" / "s3:").exists() and not (REPO / "s3:").exists()
