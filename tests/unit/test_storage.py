"""LocalStore: commit protocol, crash consistency, corruption, safe loading, purge.

Real DCP saves and loads throughout (single process here; 2 gloo ranks in
tests/distributed/test_storage_dist.py). Crashes are real SIGKILLs of forked children.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import logging
import multiprocessing
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import LoadPlan

from cairn.checkpoint import fsio
from cairn.checkpoint import reader as reader_module
from cairn.checkpoint import writer as writer_module
from cairn.checkpoint.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointError, find_checkpoint_error
from cairn.checkpoint.faults import FAULT_ENV
from cairn.checkpoint.fsio import is_hf_dir
from cairn.checkpoint.layout import MANIFEST_NAME
from cairn.checkpoint.local import LocalStore
from cairn.checkpoint.manifest import manifest_bytes
from cairn.checkpoint.reader import load_full_state_dict
from cairn.checkpoint.dcp_metadata import load_metadata_file

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DCP warns that no process group exists


# --- helpers -----------------------------------------------------------------------------

def make_state(step: int) -> dict:
    """A small training state: model tensors (fp32, bf16), optimizer, and plain Python items."""
    g = torch.Generator().manual_seed(step)
    return {
        "tok_embeddings.weight": torch.randn(32, 16, generator=g),
        "layers.0.attention.wq.weight": torch.randn(16, 16, generator=g).to(torch.bfloat16),
        "norm.weight": torch.rand(16, generator=g),
        "optimizer": {"state": {"norm.weight": {"step": torch.tensor(float(step)),
                                                "exp_avg": torch.randn(16, generator=g)}},
                      "param_groups": [{"lr": 1e-3 * step, "params": ["norm.weight"]}]},
        "train_state": {"step": step, "losses": [1.5, 1.25 + step]},
        "dataloader": {"position": 7 * step, "name": "corpus"},
    }


def assert_same(actual, expected, path="") -> None:
    if isinstance(expected, dict):
        assert set(actual) == set(expected), path
        for key in expected:
            assert_same(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, torch.Tensor):
        assert actual.dtype == expected.dtype and torch.equal(actual, expected), path
    else:
        assert actual == expected, path


def save(storage: LocalStore, step: int, **info) -> dict:
    state = make_state(step)
    dcp.save(state, storage_writer=storage.writer(step, {"kind": "full", **info}), no_dist=True)
    return state


def load(storage: LocalStore, step: int, verify: bool = True) -> dict:
    state = make_state(10_000)  # same structure, other values
    storage.load(state, storage.step_dir(step), verify=verify, no_dist=True)
    return state


def folder_names(storage: LocalStore) -> list[str]:
    return sorted(os.listdir(storage.folder))


@pytest.fixture
def storage(tmp_path) -> LocalStore:
    return LocalStore(tmp_path / "checkpoint")


# --- commit protocol ---------------------------------------------------------------------

def test_sync_save_commits_roundtrips_and_verifies(storage):
    saved = save(storage, 5, layout={"dp_shard": 1}, dtype="mixed")
    assert storage.committed_steps() == [5]
    assert folder_names(storage) == ["step-5"]  # no staging or trash left behind
    assert_same(load(storage, 5), saved)
    assert storage.verify(storage.step_dir(5)) == []

    manifest = storage.read_manifest(storage.step_dir(5))
    assert manifest["step"] == 5 and manifest["kind"] == "full" and manifest["storage"] == "dcp"
    assert manifest["layout"] == {"dp_shard": 1} and manifest["torch_version"] == torch.__version__
    assert set(manifest["files"]) == {".metadata", "__0_0.distcp"}
    data = manifest["files"]["__0_0.distcp"]
    assert data["size"] == (storage.step_dir(5) / "__0_0.distcp").stat().st_size
    assert "norm.weight" in data["fqns"]
    assert manifest["entries"]["layers.0.attention.wq.weight"] == {
        "type": "tensor", "dtype": "bfloat16", "shape": [16, 16], "num_chunks": 1, "files": ["__0_0.distcp"]}
    assert manifest["entries"]["train_state.step"]["type"] == "object"


def test_step_is_invisible_until_published(storage, monkeypatch):
    save(storage, 1)
    seen = {}
    publish = writer_module.publish_staging

    def checking_publish(folder, staging, step):
        seen["before"] = storage.committed_steps()
        seen["staged"] = sorted(os.listdir(staging))
        return publish(folder, staging, step)

    monkeypatch.setattr(writer_module, "publish_staging", checking_publish)
    save(storage, 2)
    assert seen["before"] == [1]
    assert seen["staged"] == [".metadata", "__0_0.distcp", MANIFEST_NAME]
    assert storage.committed_steps() == [1, 2]


class _GatedPlanner(DefaultSavePlanner):
    """Holds the write of the first item until ``gate`` is set (runs in DCP's writer thread)."""

    def __init__(self, gate: threading.Event):
        super().__init__()
        self.gate = gate

    def resolve_data(self, write_item):
        assert self.gate.wait(30)
        return super().resolve_data(write_item)


def test_async_save_publishes_only_when_done(storage):
    save(storage, 1)
    gate = threading.Event()
    state = make_state(2)
    future = dcp.async_save(state, storage_writer=storage.writer(2, {"kind": "full"}),
                            planner=_GatedPlanner(gate), no_dist=True)
    future = getattr(future, "upload_completion", future)
    try:
        deadline = time.monotonic() + 30
        while not (storage.folder / ".tmp-step-2").is_dir() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert (storage.folder / ".tmp-step-2").is_dir()  # the save is under way...
        assert storage.committed_steps() == [1]  # ...and invisible
    finally:
        gate.set()
    future.result(timeout=60)
    assert storage.committed_steps() == [1, 2]
    assert_same(load(storage, 2), state)


def test_stock_tools_read_cairn_steps(storage, tmp_path):
    saved = save(storage, 3)
    step_dir = storage.step_dir(3)
    # plain dcp.load with a stock reader
    state = make_state(10_000)
    dcp.load(state, storage_reader=FileSystemReader(step_dir), no_dist=True)
    assert_same(state, saved)
    # the stock command-line converter
    out = tmp_path / "out.pt"
    subprocess.run([sys.executable, "-m", "torch.distributed.checkpoint.format_utils", "dcp_to_torch",
                    str(step_dir), str(out)], check=True, capture_output=True)
    converted = torch.load(out, weights_only=False)
    assert torch.equal(converted["tok_embeddings.weight"], saved["tok_embeddings.weight"])
    assert converted["train_state"] == saved["train_state"]
    # and cairn's own safe equivalent
    assert_same(load_full_state_dict(step_dir, verify=True), saved)


def test_stock_dcp_dirs_are_committed_and_load_safely(storage):
    saved = make_state(4)
    dcp.save(saved, storage_writer=FileSystemWriter(storage.folder / "step-4"), no_dist=True)
    assert storage.committed_steps() == [4]
    assert_same(load(storage, 4), saved)
    notes = []
    assert storage.verify(storage.step_dir(4), notes=notes) == []
    assert "checksums unavailable" in notes[0]
    assert storage.read_manifest(storage.step_dir(4)) is None


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_replacing_a_step(storage, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(fsio, "exchange", lambda a, b: False)
    elif fsio._renameat2() is None:
        pytest.skip("no renameat2 here")
    save(storage, 1)
    first = save(storage, 2)
    second = make_state(2)
    second["train_state"]["step"] = 99
    dcp.save(second, storage_writer=storage.writer(2, {"kind": "full"}), no_dist=True)
    assert storage.committed_steps() == [1, 2]
    assert folder_names(storage) == ["step-1", "step-2"]
    loaded = load(storage, 2)
    assert loaded["train_state"]["step"] == 99 and first["train_state"]["step"] == 2


def test_checksums_can_be_turned_off(storage):
    state = make_state(1)
    dcp.save(state, storage_writer=storage.writer(1, {"kind": "full"}, checksums=False), no_dist=True)
    manifest = storage.read_manifest(storage.step_dir(1))
    assert manifest["checksum_algorithm"] is None
    assert all(record["checksum"] is None and record["size"] > 0 for record in manifest["files"].values())
    notes = []
    assert storage.verify(storage.step_dir(1), notes=notes) == []
    assert "without checksums" in notes[0]


def test_writer_uses_threads_and_files_per_item(storage):
    state = make_state(1)
    writer = storage.writer(1, {"kind": "full"}, thread_count=2, single_file_per_rank=False)
    dcp.save(state, storage_writer=writer, no_dist=True)
    manifest = storage.read_manifest(storage.step_dir(1))
    assert len(manifest["files"]) > 3
    assert storage.verify(storage.step_dir(1)) == []
    assert_same(load(storage, 1), state)


@pytest.mark.parametrize("checksums", [True, False], ids=["xxh3", "no-checksums"])
def test_writer_starts_writeback_as_it_writes(storage, monkeypatch, checksums):
    # The disk's writeback is started every WRITEBACK_BYTES of a file, over ranges that tile
    # what was written so far, whether or not the writer hashes; the files stay whole.
    calls: list[tuple[int, int, int, int]] = []

    def record(fd, offset, length, flags):
        calls.append((fd, offset, length, flags))
        return 0

    monkeypatch.setattr(fsio, "_sync_file_range", record)
    monkeypatch.setattr(fsio, "WRITEBACK_BYTES", 1 << 20)
    state = {"big": torch.randn(1 << 20), "small": torch.randn(8), "step": 3}  # a 4 MiB tensor
    dcp.save(state, storage_writer=storage.writer(1, {"kind": "full"}, checksums=checksums), no_dist=True)
    assert calls and all(flags == 2 for _, _, _, flags in calls)  # SYNC_FILE_RANGE_WRITE
    ranges = [(offset, length) for _, offset, length, _ in calls]
    assert ranges[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:]))
    data_file, = [p for p in storage.step_dir(1).iterdir() if p.suffix == ".distcp"]
    assert 4 << 20 <= sum(n for _, n in ranges) <= data_file.stat().st_size
    assert storage.verify(storage.step_dir(1)) == []
    loaded = {"big": torch.empty(1 << 20), "small": torch.empty(8), "step": 0}
    storage.load(loaded, storage.step_dir(1), verify=True, no_dist=True)
    assert torch.equal(loaded["big"], state["big"]) and loaded["step"] == 3


def test_writeback_size_from_the_environment(storage, monkeypatch):
    # CAIRN_WRITEBACK_MB: another size, 0 for never; a bad value names the variable when the
    # writer is made, before anything is written.
    calls: list[int] = []
    monkeypatch.setattr(fsio, "_sync_file_range", lambda fd, offset, length, flags: calls.append(length) or 0)
    state = {"big": torch.randn(1 << 20)}
    monkeypatch.setenv("CAIRN_WRITEBACK_MB", "0")
    dcp.save(state, storage_writer=storage.writer(1, {"kind": "full"}), no_dist=True)
    assert calls == []
    monkeypatch.setenv("CAIRN_WRITEBACK_MB", "0.5")
    dcp.save(state, storage_writer=storage.writer(2, {"kind": "full"}), no_dist=True)
    assert calls and sum(calls) >= 4 << 20  # the default (64 MiB) starts none for a 4 MiB file
    for bad in ("fast", "-1", "nan"):
        monkeypatch.setenv("CAIRN_WRITEBACK_MB", bad)
        with pytest.raises(CheckpointError, match="CAIRN_WRITEBACK_MB"):
            storage.writer(3, {"kind": "full"})
    assert sorted(p.name for p in storage.folder.iterdir() if p.name.startswith("step-")) == ["step-1", "step-2"]


def test_start_writeback_on_this_platform(tmp_path):
    # Linux has sync_file_range (CI and the GPU hosts); elsewhere it reports False, a no-op.
    path = tmp_path / "f.bin"
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 16))
        f.flush()
        started = fsio.start_writeback(f.fileno(), 0, 1 << 16)
    assert started is sys.platform.startswith("linux")
    assert fsio.start_writeback(123456, 0, 0) is False  # nothing to write back


def _zip_crcs(step_dir: Path, fqn: str) -> list[int]:
    """The zip CRC32 fields of the torch.save payload that holds ``fqn`` in a DCP step."""
    import zipfile

    metadata = load_metadata_file(step_dir / ".metadata")
    (index, info), = [(i, v) for i, v in metadata.storage_data.items() if i.fqn == fqn]
    with open(step_dir / info.relative_path, "rb") as f:
        f.seek(info.offset)
        payload = f.read(info.length)
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        return [entry.CRC for entry in archive.infolist() if "/data/" in entry.filename]


@pytest.mark.parametrize("checksums", [True, False], ids=["xxh3", "no-checksums"])
def test_writer_skips_torch_save_crc32_and_restores_the_setting(storage, checksums):
    # torch.load never checks the zip CRC32 torch.save computes; cairn's writer skips it (the
    # manifest's xxh3 is the check) and leaves the process-wide switch as it found it.
    assert torch.serialization.get_crc32_options() is True
    state = make_state(1)
    dcp.save(state, storage_writer=storage.writer(1, {"kind": "full"}, checksums=checksums), no_dist=True)
    assert torch.serialization.get_crc32_options() is True
    assert _zip_crcs(storage.step_dir(1), "tok_embeddings.weight") == [0]
    # stock DCP (and the weights-only torch.load in it) reads the payloads as before
    loaded = make_state(10_000)
    dcp.load(loaded, storage_reader=FileSystemReader(storage.step_dir(1)), no_dist=True)
    assert_same(loaded, state)
    # a plain torch.save afterwards computes its CRC again
    torch.serialization.set_crc32_options(False)
    try:
        dcp.save(state, storage_writer=storage.writer(2, {"kind": "full"}), no_dist=True)
        assert torch.serialization.get_crc32_options() is False  # the caller's setting, restored
    finally:
        torch.serialization.set_crc32_options(True)


def test_read_ahead_budget_and_shared_items(storage, monkeypatch):
    saved = save(storage, 1)
    # A budget smaller than any item: the reader still goes one item at a time.
    monkeypatch.setattr(reader_module, "READ_AHEAD_BYTES", 1)
    assert_same(load(storage, 1, verify=False), saved)
    # Two requests served by one stored item (a row split of one saved tensor) read it once.
    reads = []
    real = torch.load
    monkeypatch.setattr(reader_module.torch, "load", lambda f, **kw: reads.append(f) or real(f, **kw))
    reader = storage.reader(storage.step_dir(1))
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, True)
    target = torch.zeros(32, 16)
    planner = DefaultLoadPlanner()
    planner.set_up_planner({"tok_embeddings.weight": target}, metadata, True)
    items = [i for i in planner.create_local_plan().items if i.dest_index.fqn == "tok_embeddings.weight"]
    top = dataclasses.replace(items[0], dest_offsets=torch.Size([0, 0]), storage_offsets=torch.Size([0, 0]),
                              lengths=torch.Size([16, 16]))
    bottom = dataclasses.replace(items[0], dest_offsets=torch.Size([16, 0]), storage_offsets=torch.Size([16, 0]),
                                 lengths=torch.Size([16, 16]))
    reader.read_data(LoadPlan([top, bottom]), planner).wait()
    assert torch.equal(target, saved["tok_embeddings.weight"])
    assert len(reads) == 1


def test_verifying_read_hashes_behind_the_reads_in_file_order(storage, monkeypatch):
    """A thread of its own hashes each file, following the read-ahead thread through it. With
    reads of 64 bytes every file takes many rounds between the two, and the hashes still come
    out whole and in file order (an intact step loads) and see a flip anywhere."""
    monkeypatch.setattr(reader_module, "_READ_CHUNK", 64)
    state = make_state(1)
    dcp.save(state, storage_writer=storage.writer(1, {"kind": "full"}, thread_count=2), no_dist=True)
    step_dir = storage.step_dir(1)
    files = sorted(step_dir.glob("*.distcp"))
    assert len(files) == 2
    assert_same(load(storage, 1, verify=True), state)
    for path in files:
        size = path.stat().st_size
        for offset in (100, size // 2, size - 100):
            _flip(path, offset)
            with pytest.raises(CorruptCheckpointError, match=path.name):
                load(storage, 1, verify=True)
            _flip(path, offset)
    # The hashing thread finished every data file itself: none was hashed again afterwards.
    rehashed = []
    real_check = reader_module.check_files
    monkeypatch.setattr(reader_module, "check_files", lambda *a, only=None, **kw: rehashed.extend(only or ["(all)"])
                        or real_check(*a, only=only, **kw))
    target = make_state(0)
    reader = storage.reader(step_dir, verify=True)
    dcp.load(target, storage_reader=reader, planner=storage.load_planner(), no_dist=True)
    assert_same(target, state)
    assert not any(name.endswith(".distcp") for name in rehashed), rehashed
    assert reader.hash_wait_s >= 0  # what the hashes added to the reads, for the benchmark


def test_read_of_a_short_file_names_it(storage):
    # A stock DCP step (no manifest, so no size check first) whose data file was cut short.
    saved = make_state(4)
    dcp.save(saved, storage_writer=FileSystemWriter(storage.folder / "step-4"), no_dist=True)
    data = storage.step_dir(4) / "__0_0.distcp"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    # named before any byte is read: the items that lie past the file's end, and its real size
    with pytest.raises(CorruptCheckpointError, match=r"claims bytes \d+\.\.\d+ of __0_0.distcp, which has \d+ bytes"):
        load(storage, 4, verify=False)


def test_bad_arguments(storage, tmp_path):
    a_file = tmp_path / "not_a_dir"
    a_file.write_text("x")
    with pytest.raises(CheckpointError, match="--checkpoint.folder"):
        LocalStore(a_file)
    with pytest.raises(ValueError, match="files"):
        storage.writer(1, {"files": 1})
    with pytest.raises(ValueError, match="keep_latest_k"):
        storage.purge(-1)
    assert storage.committed_steps() == []


# --- crash consistency -------------------------------------------------------------------

def _crash_child(folder: str, point: str, action: str, step: int, mode: str) -> None:
    os.environ[FAULT_ENV] = point
    storage = LocalStore(folder)
    if action == "purge":
        storage.purge(1)
    else:
        state = make_state(step)
        state["train_state"]["step"] = -step  # a replacement differs from the committed copy
        writer = storage.writer(step, {"kind": "full"})
        if mode == "async":
            future = dcp.async_save(state, storage_writer=writer, no_dist=True)
            getattr(future, "upload_completion", future).result()
        elif mode == "saver":  # cairn's async save: the files are written by its writer process
            from cairn.checkpoint.staging import AsyncSaver

            saver = AsyncSaver(reuse_buffers=True)
            writer.delegate = saver.write_data
            saver.submit(step, state, lambda staged: dcp.save(staged, storage_writer=writer, no_dist=True))
            saver.wait()
        else:
            dcp.save(state, storage_writer=writer, no_dist=True)
    os._exit(0)  # the fault point was not reached: the test fails on the exit code


def _run_crashing(folder: Path, point: str, action: str = "save", step: int = 3, mode: str = "sync") -> None:
    child = multiprocessing.get_context("fork").Process(target=_crash_child,
                                                        args=(str(folder), point, action, step, mode))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL, f"child exited {child.exitcode}, expected SIGKILL at {point}"


CRASHES = [  # (fault point, what the child does, step it writes, sync/async/saver)
    ("before_data", "save", 3, "sync"),
    ("mid_data", "save", 3, "sync"),
    ("after_data_before_commit", "save", 3, "sync"),
    ("during_publish", "save", 3, "sync"),
    ("mid_data", "save", 3, "async"),
    ("after_data_before_commit", "save", 3, "async"),
    ("mid_data", "save", 3, "saver"),  # the writer process takes the training process down with it
    ("after_data_before_commit", "save", 3, "saver"),
    ("during_publish", "save", 2, "sync"),  # replacing an existing step
    ("during_replace", "save", 2, "sync"),
    ("during_purge", "purge", 0, "sync"),
]


@pytest.mark.parametrize("point,action,step,mode", CRASHES, ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in CRASHES])
def test_crash_leaves_committed_steps_intact(storage, point, action, step, mode):
    saved = {1: save(storage, 1), 2: save(storage, 2)}
    _run_crashing(storage.folder, point, action, step, mode)

    steps = storage.committed_steps()
    if action == "purge":
        assert steps == [2]  # step 1 vanished in one rename, step 2 untouched
    else:
        assert steps == [1, 2]
    for step_done in steps:
        loaded = load(storage, step_done)
        if point == "during_replace":  # the new copy was already live: either copy is whole
            loaded["train_state"]["step"] = abs(loaded["train_state"]["step"])
        assert_same(loaded, saved[step_done])
        assert storage.verify(storage.step_dir(step_done)) == []
    leftovers = [name for name in folder_names(storage) if not name.startswith("step-")]
    assert leftovers, "a crash mid-save leaves a staging or trash dir behind"

    removed = storage.cleanup_incomplete()
    assert sorted(path.name for path in removed) == sorted(leftovers)
    assert folder_names(storage) == [f"step-{s}" for s in steps]


def test_crash_between_the_two_renames_of_a_fallback_replace(storage, monkeypatch):
    monkeypatch.setattr(fsio, "exchange", lambda a, b: False)
    saved = {1: save(storage, 1), 2: save(storage, 2)}
    _run_crashing(storage.folder, "during_replace", step=2)
    assert not (storage.folder / "step-2").exists()
    # the aside copy still counts as step 2, and step_dir finds it
    assert storage.committed_steps() == [1, 2]
    assert storage.step_dir(2).name == ".replaced-step-2"
    assert_same(load(storage, 2), saved[2])
    storage.cleanup_incomplete()
    assert folder_names(storage) == ["step-1", "step-2"]
    assert_same(load(storage, 2), saved[2])


def test_cleanup_incomplete_keeps_protected_and_foreign_dirs(storage, caplog):
    save(storage, 1)
    for name in (".tmp-step-2", ".tmp-step-3", ".trash-step-0-abcd", "step-9", "notes"):
        (storage.folder / name).mkdir()
    with caplog.at_level(logging.WARNING, logger="cairn"):
        removed = storage.cleanup_incomplete(protect=[3])
    assert sorted(path.name for path in removed) == [".tmp-step-2", ".trash-step-0-abcd"]
    assert folder_names(storage) == [".tmp-step-3", "notes", "step-1", "step-9"]
    assert "step-9" in caplog.text  # an uncommitted step-N is reported, not deleted
    assert storage.committed_steps() == [1]


# --- disk full / write errors --------------------------------------------------------------

def test_injected_enospc_fails_clearly_and_keeps_older_steps(storage, monkeypatch):
    saved = save(storage, 1)
    monkeypatch.setenv(FAULT_ENV, "mid_data:enospc")
    writer = storage.writer(2, {"kind": "full"})
    with pytest.raises(BaseException) as raised:
        dcp.save(make_state(2), storage_writer=writer, no_dist=True)
    error = find_checkpoint_error(raised.value)
    assert error is writer.last_error or str(error) == str(writer.last_error)
    assert "disk full" in str(error) and "step 2" in str(error) and "untouched" in str(error)
    assert storage.committed_steps() == [1]
    assert_same(load(storage, 1), saved)
    storage.discard_staging(2)
    assert folder_names(storage) == ["step-1"]


def _write_with_file_size_limit(folder: str, queue) -> None:
    # A real kernel write error: past RLIMIT_FSIZE write() fails with EFBIG (SIGXFSZ ignored).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        dcp.save(make_state(2), storage_writer=LocalStore(folder).writer(2, {"kind": "full"}), no_dist=True)
        queue.put("saved")
    except BaseException as e:
        error = find_checkpoint_error(e)
        queue.put(str(error) if error is not None else f"unwrapped: {e!r}")


def test_real_write_error_fails_clearly_and_keeps_older_steps(storage):
    saved = save(storage, 1)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_write_with_file_size_limit, args=(str(storage.folder), queue))
    child.start()
    message = queue.get(timeout=60)
    child.join(60)
    assert "file size limit" in message and "step 2" in message and str(storage.folder) in message
    assert storage.committed_steps() == [1]
    assert_same(load(storage, 1), saved)
    assert storage.cleanup_incomplete() == [storage.folder / ".tmp-step-2"]


def test_read_only_folder_fails_clearly_and_keeps_older_steps(storage):
    # chmod does not stop root; the immutable attribute does (where chattr is allowed)
    saved = save(storage, 1)
    if subprocess.run(["chattr", "+i", str(storage.folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        writer = storage.writer(2, {"kind": "full"})
        with pytest.raises(BaseException) as raised:
            dcp.save(make_state(2), storage_writer=writer, no_dist=True)
        message = str(find_checkpoint_error(raised.value))
        assert "step 2" in message and "not permitted" in message and str(storage.folder) in message
        assert storage.committed_steps() == [1]
        assert_same(load(storage, 1), saved)
    finally:
        subprocess.run(["chattr", "-i", str(storage.folder)], check=True)
    assert folder_names(storage) == ["step-1"]


# --- corruption ----------------------------------------------------------------------------

def _flip(path: Path, offset: int) -> bytes:
    original = path.read_bytes()
    data = bytearray(original)
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    return original


def _positions(size: int, count: int = 48) -> list[int]:
    return sorted({0, size - 1, *(i * size // count for i in range(count))})


@pytest.mark.parametrize("name", [MANIFEST_NAME, ".metadata", "__0_0.distcp"])
def test_every_flipped_byte_is_reported(storage, name):
    if name == MANIFEST_NAME:  # every byte of it: a small state keeps the manifest short
        dcp.save({"w": torch.ones(3), "train_state": {"step": 1}},
                 storage_writer=storage.writer(1, {"kind": "full", "lr": 1e-05}), no_dist=True)
    else:
        save(storage, 1)
    step_dir = storage.step_dir(1)
    path = step_dir / name
    size = path.stat().st_size
    offsets = range(size) if name == MANIFEST_NAME else _positions(size)
    missed = []
    for offset in offsets:
        original = _flip(path, offset)
        problems = storage.verify(step_dir)
        if not any(str(path) in problem for problem in problems):
            missed.append(offset)
        path.write_bytes(original)
    assert missed == [], f"flips at {missed[:10]} of {name} went unreported"
    assert storage.verify(step_dir) == []


def test_flipped_data_is_named_with_its_tensors_and_refused_by_a_verifying_reader(storage):
    save(storage, 1)
    step_dir = storage.step_dir(1)
    _flip(step_dir / "__0_0.distcp", 700)
    problems = storage.verify(step_dir)
    assert len(problems) == 1 and "checksum mismatch" in problems[0] and "norm.weight" in problems[0]
    assert storage.verify(step_dir, checksums=False) == []  # sizes alone cannot see a flip
    reader = storage.reader(step_dir, verify=True)
    reader.read_metadata()  # .metadata is intact: the flip is found when the data file is read
    with pytest.raises(BaseException) as raised:
        dcp.load(make_state(0), storage_reader=reader, planner=storage.load_planner(), no_dist=True)
    error = find_checkpoint_error(raised.value)  # inside DCP's CheckpointException
    assert isinstance(error, CorruptCheckpointError) and "__0_0.distcp" in str(error)
    assert isinstance(reader.last_error, CorruptCheckpointError)
    with pytest.raises(CorruptCheckpointError, match="__0_0.distcp") as raised:  # unwrapped
        storage.load(make_state(0), step_dir, verify=True, no_dist=True)
    assert any("norm.weight" in problem for problem in raised.value.problems)
    storage.load(make_state(0), step_dir, verify=False, no_dist=True)  # sizes match: loads unverified


@pytest.mark.parametrize("name", [MANIFEST_NAME, ".metadata", "__0_0.distcp"])
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_or_missing_files_are_reported(storage, name, damage):
    save(storage, 1)
    step_dir = storage.step_dir(1)
    path = step_dir / name
    if damage == "truncate":
        os.truncate(path, path.stat().st_size - 1)
    else:
        path.unlink()
    problems = storage.verify(step_dir)
    assert any(str(path) in problem for problem in problems), problems
    if name != ".metadata" or damage == "truncate":  # without .metadata stock DCP cannot even start
        with pytest.raises(CheckpointError, match=str(path).replace(".", r"\.")):
            storage.reader(step_dir).read_metadata()


def test_verify_reports_progress_and_a_missing_dir(storage):
    save(storage, 1)
    calls = []
    storage.verify(storage.step_dir(1), progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1][0] == calls[-1][1] > 0
    assert "no such checkpoint" in storage.verify(storage.folder / "step-7")[0]


# --- malicious checkpoints -----------------------------------------------------------------

class _Payload:
    """Unpickling this runs ``open(marker, "w")``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _resign_manifest(step_dir: Path) -> None:
    """What an attacker who edits files would also do: a manifest consistent with them."""
    manifest = json.loads((step_dir / MANIFEST_NAME).read_bytes())
    del manifest["manifest_checksum"]
    for name, record in manifest["files"].items():
        record["size"], record["checksum"] = fsio.hash_file(step_dir / name)
    (step_dir / MANIFEST_NAME).write_bytes(manifest_bytes(manifest))


@pytest.mark.parametrize("written_by", ["stock", "cairn", "cairn-resigned"])
def test_crafted_metadata_is_refused_and_never_runs(storage, tmp_path, written_by):
    step_dir = storage.folder / "step-1"
    if written_by == "stock":
        dcp.save(make_state(1), storage_writer=FileSystemWriter(step_dir), no_dist=True)
    else:
        save(storage, 1)
    marker = tmp_path / "pwned"
    pickle.loads(pickle.dumps(_Payload(tmp_path / "live")))
    assert (tmp_path / "live").exists()  # the payload is live
    (step_dir / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    if written_by == "cairn-resigned":
        _resign_manifest(step_dir)

    expected = CorruptCheckpointError if written_by == "cairn" else UnsafeCheckpointError
    with pytest.raises(expected, match=r"\.metadata"):
        storage.reader(step_dir, verify=True).read_metadata()
    reader = storage.reader(step_dir)
    with pytest.raises(BaseException):
        dcp.load(make_state(0), storage_reader=reader, planner=storage.load_planner(), no_dist=True)
    assert isinstance(reader.last_error, expected)
    problems = storage.verify(step_dir)
    assert any(".metadata" in p and "refusing" in p and "open" in p for p in problems), problems
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("os", "system"), ("builtins", "eval"), ("torch", "load"),
                                         ("torch.serialization", "load"), ("subprocess", "Popen")])
def test_metadata_unpickler_admits_only_dcp_classes(tmp_path, module, name):
    # GLOBAL opcode naming module.name, then STOP: refused before anything is imported or called
    crafted = tmp_path / ".metadata"
    crafted.write_bytes(b"c" + module.encode() + b"\n" + name.encode() + b"\n.")
    with pytest.raises(UnsafeCheckpointError, match=f"{module}.{name}"):
        load_metadata_file(crafted)


def test_crafted_metadata_pointing_outside_the_checkpoint_is_refused(storage):
    save(storage, 1)
    step_dir = storage.step_dir(1)
    metadata = load_metadata_file(step_dir / ".metadata")
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../../etc/passwd"
    (step_dir / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CorruptCheckpointError, match="invalid file name"):
        load_metadata_file(step_dir / ".metadata")


def test_crafted_object_item_is_refused_by_the_load_planner(storage, tmp_path):
    marker = tmp_path / "pwned"
    step_dir = storage.folder / "step-1"
    dcp.save({"w": torch.ones(2), "train_state": {"note": _Payload(marker)}},
             storage_writer=FileSystemWriter(step_dir), no_dist=True)
    assert not marker.exists()
    template = {"w": torch.zeros(2), "train_state": {"note": None}}
    with pytest.raises(BaseException) as raised:
        dcp.load(template, storage_reader=storage.reader(step_dir), planner=storage.load_planner(), no_dist=True)
    error = find_checkpoint_error(raised.value)
    assert isinstance(error, UnsafeCheckpointError)
    assert "__0_0.distcp" in str(error) and "train_state.note" in str(error)
    assert not marker.exists()


def test_crafted_tensor_item_is_refused(storage, tmp_path):
    marker = tmp_path / "pwned"
    step_dir = storage.folder / "step-1"
    dcp.save({"w": torch.ones(4)}, storage_writer=FileSystemWriter(step_dir), no_dist=True)
    buffer = io.BytesIO()
    torch.save(_Payload(marker), buffer)
    (step_dir / "__0_0.distcp").write_bytes(buffer.getvalue())
    metadata = load_metadata_file(step_dir / ".metadata")
    for info in metadata.storage_data.values():
        info.offset, info.length = 0, len(buffer.getvalue())
    (step_dir / ".metadata").write_bytes(pickle.dumps(metadata))

    reader = storage.reader(step_dir)
    with pytest.raises(BaseException) as raised:
        dcp.load({"w": torch.zeros(4)}, storage_reader=reader, planner=storage.load_planner(), no_dist=True)
    assert isinstance(reader.last_error, UnsafeCheckpointError), raised.value
    assert not marker.exists()


# --- retention -----------------------------------------------------------------------------

def test_purge_keeps_newest_k_and_protected(storage):
    for step in (1, 2, 3, 4, 5):
        save(storage, step)
    assert storage.purge(0) == []
    assert storage.purge(2, protect=[1]) == [2, 3]
    assert storage.committed_steps() == [1, 4, 5]
    assert storage.purge(1, protect=[6]) == [1, 4]  # a step being written is not yet committed
    assert storage.committed_steps() == [5]
    assert storage.purge(1) == []  # never the newest
    assert folder_names(storage) == ["step-5"]


def test_purge_never_touches_staging_dirs(storage):
    for step in (1, 2, 3):
        save(storage, step)
    (storage.folder / ".tmp-step-4").mkdir()
    storage.purge(1)
    assert folder_names(storage) == [".tmp-step-4", "step-3"]


def test_purge_survives_a_failing_delete(storage, monkeypatch, caplog):
    for step in (1, 2, 3, 4):
        save(storage, step)
    real_rmtree = shutil.rmtree
    calls = []

    def failing_once(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:
            raise PermissionError(errno.EACCES, "injected", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", failing_once)
    with caplog.at_level(logging.WARNING, logger="cairn"):
        assert storage.purge(1) == [1, 2, 3]
    assert "could not delete" in caplog.text
    assert storage.committed_steps() == [4]
    assert folder_names(storage) == ["step-4"]  # the retry at the end of purge removed the trash


def test_purge_survives_a_failing_rename(storage, monkeypatch, caplog):
    for step in (1, 2, 3):
        save(storage, step)
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name == "step-1":
            raise OSError(errno.EBUSY, "injected", str(src))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with caplog.at_level(logging.WARNING, logger="cairn"):
        assert storage.purge(1) == [2]
    assert "could not purge" in caplog.text
    assert storage.committed_steps() == [1, 3]


def test_purge_in_a_background_thread_while_saving(storage):
    for step in (1, 2):
        save(storage, step)
    errors = []

    def purge_repeatedly():
        try:
            for _ in range(20):
                storage.purge(1, protect=[3])
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    thread = threading.Thread(target=purge_repeatedly)
    thread.start()
    saved = save(storage, 3)
    thread.join()
    assert errors == []
    storage.purge(1)
    assert storage.committed_steps() == [3]
    assert_same(load(storage, 3), saved)


# --- plain directories (HF exports) --------------------------------------------------------

def test_publish_dir_commits_an_hf_export(storage):
    save(storage, 1)
    staging = storage.new_staging_dir(2, "hf")
    from safetensors.torch import save_file

    save_file({"model.norm.weight": torch.ones(4)}, staging / "model-00001-of-00001.safetensors")
    (staging / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.norm.weight": "model-00001-of-00001.safetensors"}}))
    (staging / "config.json").write_text("{}")
    assert storage.committed_steps() == [1]
    final = storage.publish_dir(staging, 2, {"kind": "hf", "dtype": "bfloat16"})
    assert final == storage.step_dir(2) and storage.committed_steps() == [1, 2]
    assert is_hf_dir(final) and not is_hf_dir(storage.step_dir(1))
    manifest = storage.read_manifest(final)
    assert manifest["storage"] == "hf" and manifest["kind"] == "hf"
    assert set(manifest["files"]) == {"model-00001-of-00001.safetensors", "model.safetensors.index.json",
                                      "config.json"}
    assert storage.verify(final) == []
    _flip(final / "config.json", 0)
    assert "config.json" in storage.verify(final)[0]
    assert folder_names(storage) == ["step-1", "step-2"]


def test_publish_dir_copies_a_dir_from_elsewhere(storage, tmp_path):
    outside = tmp_path / "export"
    (outside / "sub").mkdir(parents=True)
    (outside / "sub" / "a.bin").write_bytes(b"abc")
    storage.publish_dir(outside, 7, {"kind": "model_only"})
    assert storage.committed_steps() == [7]
    assert storage.read_manifest(storage.step_dir(7))["files"]["sub/a.bin"]["size"] == 3
    assert storage.verify(storage.step_dir(7)) == []
