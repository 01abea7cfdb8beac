"""What crashes leave in a checkpoint folder, as ``cairn checkpoint ls`` shows it and ``cairn checkpoint
clean`` removes it, on a local folder and in object storage (moto; Ceph RGW in
tests/e2e/test_s3_servers_e2e.py): saves killed -9 at fault points in real processes, the lease
they leave, a live run's folder refused, and never a committed step touched. And the commands
that messages suggest, run as printed."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shlex
import signal
from pathlib import Path

import pytest
import torch

from cairn.checkpoint import CorruptCheckpointError, load, save
from cairn.checkpoint.lease import FolderLease, lease_state
from cairn.checkpoint.store import open_store
from cairn.cli import main
from s3_server import s3  # noqa: F401 - a fixture
from test_storage import assert_same, make_state

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(params=["local", "s3"])
def folder(request, tmp_path, monkeypatch) -> str:
    """A checkpoint folder of each kind (the working directory is tmp_path: hints print relative paths)."""
    monkeypatch.chdir(tmp_path)
    if request.param == "local":
        return "ckpt"
    return request.getfixturevalue("s3").uri


def _killed_save(location: str, step: int, point: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ["CAIRN_FAULT"] = point
    store = open_store(location)
    FolderLease.acquire(store)  # held by this process: stale once it is killed
    if point == "during_purge":
        store.purge(1)
    else:
        save({"big": torch.randn(3 << 20)} if point == "during_upload" else make_state(step), store, step)
    os._exit(0)


def kill_during(location: str, step: int, point: str) -> None:
    env = {"CAIRN_S3_PART_MB": "5"}
    child = multiprocessing.get_context("fork").Process(target=_killed_save, args=(location, step, point, env))
    child.start()
    child.join(120)
    assert child.exitcode == -signal.SIGKILL, point


def ls(location: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["checkpoint", "ls", location, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_clean_removes_what_kills_left_and_nothing_else(folder, capsys):
    store = open_store(folder)
    saved = {step: make_state(step) for step in (1, 2, 3)}
    for step, state in saved.items():
        save(state, store, step)
    points = ["after_data_before_commit", "during_publish", "during_purge"] + (
        ["during_upload"] if "://" in folder else [])  # an unfinished multipart upload
    for step, point in zip((4, 5, 0, 6), points):
        kill_during(folder, step, point)
    committed = store.committed_steps()
    assert committed == [2, 3]  # the purge's kill took step 1 (made invisible first), nothing else
    listing = ls(folder, capsys)
    leftovers = [row for row in listing["steps"] if not row["committed"]]
    assert {row["step"] for row in leftovers} >= {4, 5, 1}, leftovers
    assert listing["lease"]["live"] is False and "is gone" in listing["lease"]["stale_reason"]

    assert main(["checkpoint", "clean", folder]) == 0  # a dry run
    dry = capsys.readouterr().out
    assert "nothing is changed without --yes" in dry and len(store.leftovers()) == len(leftovers)
    command = dry.strip().splitlines()[-1]
    assert command == f"  cairn checkpoint clean {shlex.quote(folder)} --yes"
    assert main(shlex.split(command)[1:]) == 0  # as printed
    assert store.leftovers() == [] and lease_state(store) is None
    assert store.committed_steps() == committed
    for step in committed:
        loaded = make_state(0)
        load(loaded, store, step)
        assert_same(loaded, saved[step])
        assert store.verify(step) == []
    capsys.readouterr()
    assert main(["checkpoint", "clean", folder]) == 0
    assert "nothing to clean" in capsys.readouterr().out


def test_clean_refuses_while_a_live_run_holds_the_folder(folder, capsys):
    store = open_store(folder)
    save(make_state(1), store, 1)
    kill_during(folder, 2, "during_publish")  # a leftover (its lease is taken over below)
    held = FolderLease.acquire(store)  # a live run: this process, heartbeating
    try:
        leftovers = store.leftovers()
        assert leftovers
        capsys.readouterr()
        assert main(["checkpoint", "clean", folder, "--yes"]) == 2
        err = capsys.readouterr().err
        assert "refused: a live run holds this folder's lease" in err and f"pid {os.getpid()}" in err
        assert len(err.strip().splitlines()) == 1
        assert store.leftovers() == leftovers and store.lease_read()[0]["token"] == held.token
        assert main(["checkpoint", "clean", folder]) == 0  # the dry run says why --yes would refuse
        assert "a live run holds the lease" in " ".join(capsys.readouterr().out.split())
    finally:
        held.release()


def test_a_folder_not_written_by_cairn_is_listed_and_kept(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save(make_state(1), "ckpt", 1)
    Path("ckpt/step-7").mkdir()  # not cairn's: no manifest, no .metadata
    (Path("ckpt/step-7") / "notes.txt").write_text("mine")
    assert main(["checkpoint", "clean", "ckpt", "--yes"]) == 0
    assert "kept (not written by cairn" in capsys.readouterr().out
    assert (Path("ckpt/step-7") / "notes.txt").read_text() == "mine"


def test_the_verify_command_a_corrupt_load_suggests_works_as_printed(folder, capsys):
    """Issue #24, item 6: for s3:// it named the save prefix (step-N/<save_id>), which verify rejects."""
    store = open_store(folder)
    save(make_state(1), store, 1)
    data = _data_objects(store, 1)[0]
    _flip_middle_byte(store, data)
    with pytest.raises(CorruptCheckpointError) as raised:
        load(make_state(0), store, 1)
    command = re.search(r"`(cairn checkpoint verify [^`]+)`", str(raised.value)).group(1)
    capsys.readouterr()
    assert main(shlex.split(command)[1:]) == 1
    assert "checksum mismatch" in capsys.readouterr().out


def _data_objects(store, step: int) -> list[str]:
    if "://" not in store.url:
        return [str(path) for path in Path(store.step_dir(step)).glob("*.distcp")]
    save_id, _ = store.committed_manifest(step)
    return [item["Key"] for item in store.list_objects(store.save_prefix(step, save_id) + "/")
            if item["Key"].endswith(".distcp")]


def _flip_middle_byte(store, location: str) -> None:
    if "://" not in store.url:
        raw = bytearray(Path(location).read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        Path(location).write_bytes(bytes(raw))
        return
    from cairn.checkpoint.s3_client import client

    raw = bytearray(client().get_object(Bucket=store.bucket, Key=location)["Body"].read())
    raw[len(raw) // 2] ^= 0xFF
    client().put_object(Bucket=store.bucket, Key=location, Body=bytes(raw))
