"""What an adversarial sweep got through, each case now refused with one clear message.

Crafted sizes, names and links in a step; steps swapped; same-size corruption on a plain
resume; full disks and read-only folders; a second run on a folder. Real files, real DCP
saves and loads (single process here; 2 ranks in tests/distributed/test_hardening_dist.py and
real training processes in tests/e2e/test_hardening_e2e.py).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from cairn.checkpoint import CheckpointError, CorruptCheckpointError, FolderBusyError, SaveError, load
from cairn.checkpoint.dcp_metadata import load_metadata_file
from cairn.checkpoint.fsio import NotRegularFileError, free_space_text, open_regular
from cairn.checkpoint.lease import FolderLease, lease_state, stale_reason
from cairn.checkpoint.local import LocalStore
from cairn.checkpoint.manifest import manifest_bytes
from tmpfs import small_tmpfs_mounter
from test_storage import _resign_manifest, make_state, save

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def storage(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "checkpoint")


def template() -> dict:
    return make_state(0)


def craft_length(step_dir: Path, length: int) -> str:
    """Set one item's declared length in .metadata and re-sign the manifest (a checksum is not a signature)."""
    metadata = load_metadata_file(step_dir / ".metadata")
    index, info = next((i, s) for i, s in metadata.storage_data.items() if i.fqn == "tok_embeddings.weight")
    info.length = length
    (step_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    _resign_manifest(step_dir)
    return info.relative_path


# --- 2. declared sizes are checked before anything is allocated ---------------------------------

@pytest.mark.parametrize("verify", [True, False])
def test_a_huge_declared_length_is_refused_before_any_allocation(storage, verify):
    save(storage, 1)
    name = craft_length(storage.step_dir(1), 1 << 50)  # a petabyte: allocating it would fail or hang
    with pytest.raises(CorruptCheckpointError, match=rf"tok_embeddings.weight' claims bytes \d+\.\.\d+ of {name}, "
                                                     rf"which has \d+ bytes"):
        load(template(), storage, 1, verify=verify)
    problems = storage.verify(1)
    assert any("claims bytes" in p and name in p for p in problems), problems


def test_the_cli_names_a_huge_declared_length(storage, capsys):
    from cairn.cli import main

    save(storage, 1)
    name = craft_length(storage.step_dir(1), 1 << 40)
    for args in (["inspect", storage.step_dir(1), "--values"], ["convert", storage.step_dir(1),
                                                               storage.folder.parent / "out.pt", "--to", "torch"]):
        code = main(["checkpoint", *map(str, args)])
        out, err = capsys.readouterr()
        text = " ".join((out + err).split())
        assert code == 1 and "claims bytes" in text and name in text and "MemoryError" not in text, text


@pytest.mark.parametrize("crafted", ["the tensor's shape", "its chunk's shape too"])
def test_convert_names_a_crafted_huge_shape(storage, capsys, crafted):
    """A tensor declared 2^60 elements in .metadata (the manifest re-signed): `convert --to torch`
    says which and why in one message, before torch's zip writer could fail on it."""
    from cairn.cli import main

    save(storage, 1)
    step_dir = storage.step_dir(1)
    metadata = load_metadata_file(step_dir / ".metadata")
    item = metadata.state_dict_metadata["tok_embeddings.weight"]
    item.size = torch.Size([1 << 40, 1 << 20])
    if crafted == "its chunk's shape too":
        for chunk in item.chunks:
            chunk.sizes = torch.Size([1 << 40, 1 << 20])
    (step_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    _resign_manifest(step_dir)
    out = storage.folder.parent / "out.pt"
    code = main(["checkpoint", "convert", str(step_dir), str(out), "--to", "torch"])
    text = " ".join("".join(capsys.readouterr()).split())
    assert code == 1 and "'tok_embeddings.weight' declares" in text and "damaged or crafted" in text, text
    assert "inline_container" not in text and "Traceback" not in text and not out.exists()


def test_a_crafted_record_cannot_make_torch_load_allocate(storage):
    """A record whose zip entry declares more bytes than it holds is refused, naming file and key."""
    save(storage, 1)
    step_dir = storage.step_dir(1)
    metadata = load_metadata_file(step_dir / ".metadata")
    index, info = next((i, s) for i, s in metadata.storage_data.items() if i.fqn == "train_state.step")
    data = step_dir / info.relative_path
    raw = bytearray(data.read_bytes())
    record = raw[info.offset:info.offset + info.length]
    central = record.rfind(b"PK\x01\x02")  # the central directory entry of the record's first member
    record[central + 24:central + 28] = (1 << 31).to_bytes(4, "little")  # its uncompressed size: 2 GiB
    raw[info.offset:info.offset + info.length] = record
    data.write_bytes(bytes(raw))
    _resign_manifest(step_dir)
    with pytest.raises(CorruptCheckpointError, match=r"train_state.step.*damaged or crafted"):
        load(template(), storage, 1)


# --- 3. names, links, devices and FIFOs -------------------------------------------------------

def test_manifest_names_outside_the_step_are_refused(storage):
    save(storage, 1)
    step_dir = storage.step_dir(1)
    manifest = json.loads((step_dir / "cairn_manifest.json").read_text())
    del manifest["manifest_checksum"]
    for name in ("../../etc/passwd", "/etc/passwd", "a/../../b", ""):
        crafted = dict(manifest, files={**manifest["files"], name: {"size": 1, "checksum": None}})
        (step_dir / "cairn_manifest.json").write_bytes(manifest_bytes(crafted))
        with pytest.raises(CorruptCheckpointError, match="not a file inside the step"):
            storage.read_manifest(1)
        assert any("not a file inside the step" in p for p in storage.verify(1))


@pytest.mark.parametrize("kind", ["symlink", "fifo", "device"])
def test_a_manifest_entry_that_is_not_a_regular_file_is_never_opened(storage, tmp_path, kind):
    save(storage, 1)
    step_dir = storage.step_dir(1)
    data = next(step_dir.glob("*.distcp"))
    data.unlink()
    if kind == "symlink":
        outside = tmp_path / "elsewhere.bin"
        outside.write_bytes(b"x")
        data.symlink_to(outside)
    elif kind == "fifo":
        os.mkfifo(data)
    else:
        data.symlink_to("/dev/zero")  # what hung verify forever: a read that never ends
    result: dict = {}

    def check() -> None:
        result["problems"] = storage.verify(1)

    thread = threading.Thread(target=check, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "verify hung on a non-regular file"
    what = {"symlink": "a symbolic link", "fifo": "a FIFO", "device": "a symbolic link"}[kind]
    assert any(data.name in p and what in p for p in result["problems"]), result["problems"]
    with pytest.raises(CheckpointError, match=what):
        load(template(), storage, 1)


def test_open_regular_refuses_links_and_devices(tmp_path):
    target = tmp_path / "file"
    target.write_bytes(b"abc")
    link = tmp_path / "link"
    link.symlink_to(target)
    os.close(open_regular(target))
    with pytest.raises(NotRegularFileError, match="symbolic link"):
        open_regular(link)
    with pytest.raises(NotRegularFileError, match="character device"):
        open_regular("/dev/null")


def test_a_symlinked_step_folder_is_not_a_step(storage, tmp_path, caplog):
    import logging

    save(storage, 1)
    outside = tmp_path / "outside"
    shutil.copytree(storage.step_dir(1), outside)
    (storage.folder / "step-8").symlink_to(outside)
    with caplog.at_level(logging.WARNING, logger="cairn"):
        assert storage.committed_steps() == [1]
    assert "step-8 is a symbolic link, not a step" in caplog.text
    assert "symbolic link" in storage.verify(storage.folder / "step-8")[0]


def test_a_symlinked_hf_weight_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    from cairn.checkpoint.hf import HFWeights
    from cairn.checkpoint.errors import HFCheckpointError

    real = tmp_path / "real.safetensors"
    save_file({"model.norm.weight": torch.ones(4)}, str(real))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "model.safetensors").symlink_to(real)
    with pytest.raises(HFCheckpointError, match="symbolic link"):
        HFWeights(hf)


# --- 4. a step's identity ------------------------------------------------------------------------

def test_swapped_step_folders_are_refused(storage):
    saved = {step: save(storage, step) for step in (6, 8)}
    folder = storage.folder
    os.rename(folder / "step-6", folder / "tmp")
    os.rename(folder / "step-8", folder / "step-6")
    os.rename(folder / "tmp", folder / "step-8")
    for step in (6, 8):
        problems = storage.verify(step)
        assert any(f"not step {step}" in p and "renamed or swapped" in p for p in problems), problems
        with pytest.raises(CorruptCheckpointError, match=f"not step {step}"):
            load(template(), storage, step, verify=False)
    assert saved  # both were valid before the swap


def test_data_files_of_two_saves_mixed_are_refused(storage):
    save(storage, 1)
    save(storage, 2)
    one, two = storage.step_dir(1), storage.step_dir(2)
    shutil.copy(one / ".metadata", two / ".metadata")  # another save's metadata, manifest re-signed
    _resign_manifest(two)
    problems = storage.verify(2)
    assert any("files of two saves were mixed" in p for p in problems), problems
    with pytest.raises(CorruptCheckpointError, match="files of two saves were mixed"):
        load(template(), storage, 2)


# --- 5. same-size corruption on a plain resume ---------------------------------------------------

@pytest.mark.parametrize("damage", ["flip", "swap"])
def test_same_size_corruption_fails_a_default_load(storage, damage):
    save(storage, 1)
    save(storage, 2)
    data = next(storage.step_dir(2).glob("*.distcp"))
    if damage == "flip":
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
    else:  # step 1's data file, the same size, in step 2's place
        other = next(storage.step_dir(1).glob("*.distcp"))
        assert other.stat().st_size == data.stat().st_size
        shutil.copy(other, data)
    with pytest.raises(CorruptCheckpointError, match=data.name):
        load(template(), storage, 2)  # verify is the default


# --- 6. errors a user can act on -------------------------------------------------------------

@pytest.fixture
def small_tmpfs():
    yield from small_tmpfs_mounter()


@pytest.fixture
def small_filesystem(tmp_path, small_tmpfs):
    """A 3 MiB tmpfs where the machine allows mounting one (root in a container that permits it)."""
    return small_tmpfs(tmp_path / "small", "3m")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_full_disk_is_one_clear_line(small_filesystem, mode):
    from cairn.checkpoint import BackgroundSaver
    from cairn.checkpoint import save as save_step

    store = LocalStore(small_filesystem / "checkpoint")
    save_step({"w": torch.ones(1000)}, store, 1)
    big = {"w": torch.ones(2 << 20)}  # 8 MiB: does not fit
    saver = BackgroundSaver("async_with_pinned_mem", writer="process") if mode == "async" else None
    with pytest.raises(SaveError) as raised:
        save_step(big, store, 2, async_saver=saver).result(timeout=60)
    if saver is not None:
        saver.close()
    message = str(raised.value)
    assert "disk full" in message and "GB free of" in message and "step 2" in message, message
    assert "untouched" in message and "inline_container" not in message
    assert store.committed_steps() == [1] and store.verify(1) == []


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_full_disk_via_the_fault_point(storage, monkeypatch, mode):
    """ENOSPC raised from the real write path (for machines that cannot mount a small filesystem)."""
    from cairn.checkpoint import BackgroundSaver
    from cairn.checkpoint import save as save_step

    save_step({"w": torch.ones(10)}, storage, 1)
    monkeypatch.setenv("CAIRN_FAULT", "mid_data:enospc")
    saver = BackgroundSaver("async_with_pinned_mem", writer="thread") if mode == "async" else None
    with pytest.raises(SaveError, match=r"disk full \(.* GB free of .* GB on "):
        save_step({"w": torch.ones(1000)}, storage, 2, async_saver=saver).result(timeout=60)
    if saver is not None:
        saver.close()
    assert storage.committed_steps() == [1]


@pytest.mark.skipif(os.geteuid() == 0 and not Path("/proc/self/uid_map").exists(), reason="root ignores modes")
def test_a_read_only_folder_is_found_at_start(tmp_path):
    from cairn.checkpoint import CheckpointManager

    folder = tmp_path / "checkpoint"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        probe = folder / "probe"
        try:
            probe.write_text("x")
            probe.unlink()
            pytest.skip("this user writes into read-only folders (root without user namespaces)")
        except PermissionError:
            pass
        model = torch.nn.Linear(2, 2)
        with pytest.raises(CheckpointError, match=r"--checkpoint.folder .* is not writable: permission denied"):
            CheckpointManager(CheckpointManager.Config(enable=True), model_parts=model, base_folder=tmp_path)
    finally:
        folder.chmod(0o755)


def test_free_space_text_names_the_filesystem(tmp_path):
    text = free_space_text(tmp_path / "not" / "yet")
    assert "GB free of" in text and str(tmp_path) in text


def test_refusals_never_suggest_loading_unsafely(storage, tmp_path):
    from test_storage import _Payload

    marker = tmp_path / "pwned"
    step_dir = storage.folder / "step-1"
    dcp.save({"w": torch.ones(2), "train_state": {"note": _Payload(marker)}},
             storage_writer=storage.writer(1, {"kind": "full"}), no_dist=True)
    with pytest.raises(CheckpointError) as raised:
        load({"w": torch.zeros(2), "train_state": {"note": None}}, storage, 1)
    message = str(raised.value)
    assert "weights_only=False" not in message and "will likely succeed" not in message
    assert "__0_0.distcp" in message and "train_state.note" in message and "nothing from it was run" in message
    assert not marker.exists() and step_dir.exists()


# --- 1. the folder's lease -----------------------------------------------------------------------

def test_a_live_holder_is_named_and_a_dead_one_taken_over(storage, monkeypatch):
    first = FolderLease.acquire(storage)
    with pytest.raises(FolderBusyError, match=r"in use by another run \(host .*, pid %d" % os.getpid()):
        FolderLease.acquire(storage)
    first.release()
    assert lease_state(storage) is None
    # a holder on this host whose process is gone (SIGKILLed): taken over at once
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    stale = {"host": os.uname().nodename, "pid": child.pid, "started": "x", "heartbeat": time.time(),
             "token": "dead", "run_id": None, "restart": 0, "job_id": None}
    assert storage.lease_replace(stale, storage.lease_read()[1]) is not None
    lease = FolderLease.acquire(storage)
    assert lease.record["pid"] == os.getpid()
    lease.release()
    assert lease_state(storage) is None


def test_staleness_rules():
    me = {"host": "a", "pid": os.getpid(), "run_id": "r1", "restart": 2}
    fresh = {"host": "b", "pid": 1, "heartbeat": 5.0, "run_id": "other", "restart": 0}
    assert stale_reason(fresh, me, 60, age=5) is None
    assert stale_reason(fresh, me, 60) is None  # an age not known: never stale by age
    assert "last renewed 100 s ago" in stale_reason(fresh, me, 60, age=100)
    assert stale_reason({**fresh, "heartbeat": -1e9}, me, 60, age=5) is None  # the record's own clock is not read
    assert "torchrun restarted" in stale_reason({**fresh, "run_id": "r1", "restart": 1}, me, 60, age=5)
    assert stale_reason({**fresh, "run_id": "r1", "restart": 2}, me, 60, age=5) is None


def test_startup_cleanup_never_runs_without_the_lease(storage):
    """A second manager refuses before it touches the folder: the first one's save in flight stays."""
    from cairn.checkpoint import CheckpointManager

    save(storage, 1)
    in_flight = storage.folder / ".tmp-step-2"
    in_flight.mkdir()
    (in_flight / "__0_0.distcp").write_bytes(b"being written")
    lease = FolderLease.acquire(storage)
    try:
        with pytest.raises(FolderBusyError):
            CheckpointManager(CheckpointManager.Config(enable=True, folder=str(storage.folder)),
                              model_parts=torch.nn.Linear(2, 2))
        assert (in_flight / "__0_0.distcp").read_bytes() == b"being written"
    finally:
        lease.release()


def test_the_lease_is_renewed_and_a_lost_lease_stops_saving(storage, monkeypatch):
    monkeypatch.setenv("CAIRN_LEASE_HEARTBEAT", "0.05")
    held = FolderLease.acquire(storage)
    first_beat = storage.lease_read()[0]["heartbeat"]
    time.sleep(0.3)
    assert storage.lease_read()[0]["heartbeat"] > first_beat
    record, version = storage.lease_read()
    storage.lease_replace({**record, "token": "thief", "pid": 1}, version)  # another run took it over
    deadline = time.monotonic() + 5
    while held.lost is None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(CheckpointError, match="was taken by"):
        held.check()
    held.release()
    assert storage.lease_read()[0]["token"] == "thief"  # a lost lease is not deleted by its old holder
