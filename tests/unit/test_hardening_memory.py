"""The memory tier against what an attacker or a careless user leaves in its directory (#26).

A run (the library API, one process) takes snapshots of steps 2 and 4, trains to step 5 and
stops; each test damages or crafts a copy of what it left, as a sweep did, and restarts:

1. links planted in a slot are never written through (the file they point to is untouched);
   a memory directory another user made, or one not private, is refused naming it;
2. another run's snapshot (another folder, seed or config, or a new run on a wiped folder)
   is refused naming why; the default directory is the folder's canonical location's;
3. a snapshot's step is checked against its train state, its data position and the progress
   files: a claimed step 100, or two slots' steps swapped, are refused;
4. /dev/zero and a FIFO in a slot are refused at once, reading nothing (a child process with
   bounded memory, timed);
5. every crafted field (record, sizes, offsets, leaves, a state.pt with a payload) is one
   logged line naming the file and why, then the next snapshot, then the folder; a payload's
   marker is never created. ``cairn checkpoint ls --memory`` says "unusable" for the same.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import xxhash
from torch import nn

from cairn.checkpoint import CheckpointError, CheckpointManager, OptimizerState
from cairn.checkpoint.memory_slots import (default_dir, list_snapshots, open_private_dir, read_progress,
                                           run_identity)
from cairn.data.dataloader import StatefulDataLoader
from cairn.trainer import TrainState

SEED = 0
BATCH = 4  # sequences per step of the data position below


class Position:
    """A data loader's position (the real loader's rule for how many steps it has served)."""

    steps_done = staticmethod(StatefulDataLoader.steps_done)

    def __init__(self):
        self.position = 0

    def state_dict(self):
        return {"position": self.position, "global_batch_size": BATCH}

    def load_state_dict(self, state):
        self.position = state["position"]


OPEN: list[CheckpointManager] = []  # closed after each test (their leases, threads)


@pytest.fixture(autouse=True)
def close_managers():
    yield
    while OPEN:
        OPEN.pop().close()


class Run:
    """One process of a training run: model, optimizer, train state, data position, manager."""

    def __init__(self, base: Path, memory_dir: Path | None, seed: int = SEED, **overrides):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.train_state, self.data = TrainState(), Position()
        config = CheckpointManager.Config(enable=True, interval=100, keep_latest_k=0, last_save_model_only=False,
                                          memory_interval=2, memory_dir=str(memory_dir) if memory_dir else None,
                                          **overrides)
        self.manager = CheckpointManager(
            config, model_parts=self.model, base_folder=base, seed=seed, model_info={"name": "mlp"},
            states={"optimizer": OptimizerState(self.model, self.optimizer), "train_state": self.train_state,
                    "dataloader": self.data},
            run_info={"resume_config": {"seed": seed, "batch": BATCH}})
        OPEN.append(self.manager)

    def train(self, until: int) -> None:
        while self.train_state.step < until:
            self.train_state.step += 1
            step = self.train_state.step
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
            self.model(x).pow(2).mean().backward()
            self.manager.maybe_wait_for_staging()
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.data.position += BATCH
            self.manager.save(step)
            if self.manager.memory is not None:
                self.manager.memory.wait()

    def weights(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A run that snapshotted steps 2 and 4 and stopped after step 5 (its snapshots kept), and a copy."""
    base = tmp_path_factory.mktemp("memory-run")
    run = Run(base, base / "shm")
    run.train(5)
    run.manager.close()
    OPEN.clear()
    shutil.copytree(base, base.with_name(base.name + "-pristine"), symlinks=True)
    return base


@pytest.fixture
def left(pristine):
    """What the stopped run left, fresh for each test at its own paths (its identity names the folder)."""
    shutil.rmtree(pristine, ignore_errors=True)
    shutil.copytree(pristine.with_name(pristine.name + "-pristine"), pristine, symlinks=True)
    return pristine


def slot_of(shm: Path, step: int) -> Path:
    for committed in (shm / "rank-0").glob("slot-*/COMMITTED"):
        if json.loads(committed.read_text())["step"] == step:
            return committed.parent
    raise AssertionError(f"no slot holds step {step}")


def edit_record(slot: Path, edit) -> None:
    record = json.loads((slot / "COMMITTED").read_text())
    edit(record)
    (slot / "COMMITTED").write_text(json.dumps(record))


def rewrite_state(slot: Path, state: bytes) -> None:
    """Replace state.pt and re-sign the record as an attacker would (a checksum is not a signature)."""
    (slot / "state.pt").write_bytes(state)
    edit_record(slot, lambda r: r.update(state_bytes=len(state), state_xxh3=xxhash.xxh3_128(state).hexdigest()))


def edited_state(slot: Path, edit) -> bytes:
    plain = torch.load(slot / "state.pt", weights_only=True)
    edit(plain)
    buffer = __import__("io").BytesIO()
    torch.save(plain, buffer)
    return buffer.getvalue()


def restart(base: Path, caplog, **kwargs) -> tuple[Run, list[logging.LogRecord]]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cairn"):
        run = Run(base, kwargs.pop("memory_dir", base / "shm"), **kwargs)
        run.manager.load()
    return run, [r for r in caplog.records if r.levelno >= logging.WARNING]


def one_line_naming(records, *words) -> logging.LogRecord:
    """The one warning naming every word, on one line."""
    found = [r for r in records if all(w in r.getMessage() for w in words)]
    assert found, [r.getMessage() for r in records]
    assert "\n" not in found[0].getMessage() and "Traceback" not in found[0].getMessage()
    return found[0]


def test_a_restart_of_the_same_run_restores_its_newest_snapshot(left, caplog):
    run, warnings = restart(left, caplog)
    assert run.manager.last_load["tier"] == "memory" and run.manager.last_load["from_step"] == 4
    assert run.train_state.step == 4 and run.data.position == 4 * BATCH and not warnings


# --- 1. links, and a directory that is not this user's alone --------------------------------------

def test_links_planted_in_the_slots_are_never_written_through(left, tmp_path, caplog):
    """Every name a snapshot writes (data.bin, state.pt.tmp, COMMITTED.tmp, progress-0, run.json)
    planted as a link to a victim file: the restart and the next snapshots replace the links,
    the victim keeps its bytes."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 512)
    victim.chmod(0o600)
    shm = left / "shm"
    older, newer = slot_of(shm, 2), slot_of(shm, 4)
    for path in (older / "data.bin", older / "state.pt.tmp", older / "COMMITTED.tmp", newer / "state.pt.tmp",
                 newer / "COMMITTED.tmp", shm / "progress-0", shm / "progress-0.tmp", shm / "run.json.tmp"):
        path.unlink(missing_ok=True)
        path.symlink_to(victim)
    run, warnings = restart(left, caplog)
    assert run.manager.last_load["from_step"] == 4  # the slot without links is whole
    one_line_naming(warnings, str(older / "data.bin"), "symbolic link", "never followed")
    run.train(8)  # snapshots of steps 6 and 8 are written into both slots
    run.manager.close()
    assert victim.read_bytes() == b"precious" * 512
    assert [row["step"] for row in list_snapshots(shm)] == [8, 6]
    for slot in (older, newer):
        assert all(stat.S_ISREG(os.lstat(slot / name).st_mode) for name in ("data.bin", "state.pt", "COMMITTED"))
    assert read_progress(shm / "progress-0") == 8 and not (shm / "progress-0").is_symlink()


@pytest.mark.parametrize("planted", ["a link", "a hard link", "a FIFO"])
def test_the_staging_never_maps_a_planted_data_bin(tmp_path, planted):
    """Planted after the tier opened its slots (so not cleaned away): the staging that writes
    data.bin in place refuses it, and the file it leads to keeps its bytes."""
    from cairn.checkpoint.fsio import NotRegularFileError
    from cairn.checkpoint.staging import HostArena

    victim = tmp_path / "victim"
    victim.write_bytes(b"precious" * 512)
    data = tmp_path / "data.bin"
    {"a link": data.symlink_to, "a hard link": data.hardlink_to}.get(planted, lambda _: os.mkfifo(data))(victim)
    with pytest.raises(NotRegularFileError, match=str(data)):
        HostArena(1 << 16, pin=False, path=str(data))
    assert victim.read_bytes() == b"precious" * 512


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory another user owns needs root")
def test_a_directory_another_user_made_first_is_refused_untouched(tmp_path):
    """Another local user creates the (predictable) default directory first, mode 777, with a
    link in it: the run refuses it naming it, and writes nothing there."""
    base = tmp_path / "run"
    identity = run_identity(str(base / "checkpoint"), {"name": "mlp"}, {"seed": SEED, "config": {"seed": SEED,
                                                                                                   "batch": BATCH}})
    planted = default_dir(identity)
    planted.mkdir()
    try:
        (planted / "rank-0").symlink_to(tmp_path)
        os.chown(planted, 12345, 12345)
        planted.chmod(0o777)
        with pytest.raises(CheckpointError, match=rf"--checkpoint.memory_dir: {planted} belongs to uid 12345"):
            Run(base, None)
        assert sorted(p.name for p in planted.iterdir()) == ["rank-0"] and list(tmp_path.iterdir()) == [base]
    finally:
        shutil.rmtree(planted)


@pytest.mark.parametrize("planted", ["mode 777", "a link", "a file", "world-writable parent"])
def test_a_memory_dir_that_is_not_private_is_refused_naming_it(tmp_path, planted):
    shm = tmp_path / "shm"
    if planted == "mode 777":
        shm.mkdir(mode=0o777)
        shm.chmod(0o777)
        expected = rf"{shm} has mode 777, not 700"
    elif planted == "a link":
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        shm.symlink_to(tmp_path / "elsewhere")
        expected = rf"{shm} is a symbolic link"
    elif planted == "a file":
        shm.write_text("x")
        expected = rf"{shm} is not a directory"
    else:
        (tmp_path / "open").mkdir()
        (tmp_path / "open").chmod(0o777)  # not sticky: anyone could rename what lies in it
        shm = tmp_path / "open" / "shm"
        expected = rf"{tmp_path / 'open'} is writable by every user"
    with pytest.raises(CheckpointError, match=expected):
        Run(tmp_path / "run", shm)
    assert not any((tmp_path / "elsewhere").iterdir()) if planted == "a link" else True


def test_a_new_memory_dir_is_private_whatever_the_umask(tmp_path):
    old = os.umask(0o000)
    try:
        path = open_private_dir(tmp_path / "a" / "shm")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700 and path.stat().st_uid == os.geteuid()


# --- 2. another run's snapshots -------------------------------------------------------------------

@pytest.mark.parametrize("case", ["another folder and seed", "the same folder, wiped", "another seed"])
def test_another_runs_snapshot_is_refused_naming_why(left, caplog, case):
    base, why = left, None
    if case == "another folder and seed":  # a new run, an empty dump folder, the same --checkpoint.memory_dir
        base, seed, why = left / "other", 1, "its checkpoint folder is"
    elif case == "the same folder, wiped":  # the user deleted the folder and reran the same command
        shutil.rmtree(left / "checkpoint")
        seed, why = SEED, "a new run"
    else:
        seed, why = 1, "its run config differs"
    theirs = json.loads((left / "shm" / "run.json").read_text())["id"]
    fresh = Run(left / "fresh", left / "fresh-shm", seed=seed).weights()
    run, warnings = restart(base, caplog, memory_dir=left / "shm", seed=seed)
    assert run.manager.last_load is None and run.train_state.step == 0
    assert all(torch.equal(a, b) for a, b in zip(run.weights(), fresh))  # its own fresh weights
    one_line_naming(warnings, str(slot_of(left / "shm", 4)), "another run's", why)
    run.train(2)  # its own snapshot goes in; the other run's is never restored
    mine = json.loads((left / "shm" / "run.json").read_text())["id"]
    assert mine != theirs and json.loads((slot_of(left / "shm", 2) / "COMMITTED").read_text())["run"]["id"] == mine


def test_the_default_dir_is_the_canonical_folders(tmp_path, monkeypatch):
    """``outputs`` from two working directories: two folders, two directories; the same folder
    through a link: one."""
    identity = {"model": {"name": "mlp"}, "resume_config": None}
    for cwd in ("a", "b"):
        (tmp_path / cwd).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    first = default_dir(run_identity("outputs/exp", **identity))
    monkeypatch.chdir(tmp_path / "b")
    assert default_dir(run_identity("outputs/exp", **identity)) != first
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert default_dir(run_identity(str(tmp_path / "link" / "outputs/exp"), **identity)) == first
    assert default_dir(run_identity("outputs/exp", {"name": "mlp"}, {"seed": 1})) != \
        default_dir(run_identity("outputs/exp", {"name": "mlp"}, {"seed": 2}))  # the run config is in the name
    assert f"cairn-{os.geteuid()}-" in first.name


def test_default_dirs_of_two_working_directories_do_not_share(tmp_path, monkeypatch):
    """The same relative ``--job.dump_folder`` from two working directories, default memory dir:
    the second run starts fresh instead of resuming the first's snapshot."""
    dirs = []
    try:
        for cwd in ("a", "b"):
            (tmp_path / cwd).mkdir()
            monkeypatch.chdir(tmp_path / cwd)
            run = Run(Path("outputs"), None)
            dirs.append(run.manager.memory.dir)
            assert run.manager.load().tier == "none"
            run.train(2)
            run.manager.close()
        assert dirs[0] != dirs[1] and all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in dirs)
    finally:
        for directory in dirs:
            shutil.rmtree(directory, ignore_errors=True)


# --- 3. the step a snapshot claims ----------------------------------------------------------------

def test_a_step_past_what_was_trained_is_refused(left, caplog):
    """step 100 written into the newest record of a run that trained to step 5 (the progress file)."""
    newest = slot_of(left / "shm", 4)
    edit_record(newest, lambda r: r.update(step=100))
    run, warnings = restart(left, caplog)
    assert run.manager.last_load["from_step"] == 2 and run.train_state.step == 2
    one_line_naming(warnings, str(newest), "claims step 100", "trained only to step 5")


def test_two_slots_with_their_steps_swapped_are_refused(left, caplog):
    shm = left / "shm"
    older, newer = slot_of(shm, 2), slot_of(shm, 4)
    edit_record(older, lambda r: r.update(step=4))
    edit_record(newer, lambda r: r.update(step=2))
    run, warnings = restart(left, caplog)
    assert run.manager.last_load is None and run.train_state.step == 0  # neither is what it claims
    one_line_naming(warnings, str(older), "claims step 4, its train_state is at step 2", "trying step 2")
    one_line_naming(warnings, str(newer), "claims step 2, its train_state is at step 4", "starting without it")


def test_a_data_position_of_another_step_is_refused(left, caplog):
    newest = slot_of(left / "shm", 4)
    rewrite_state(newest, edited_state(newest, lambda plain: plain["dataloader"].update(position=3 * BATCH)))
    run, warnings = restart(left, caplog)
    assert run.manager.last_load["from_step"] == 2
    one_line_naming(warnings, str(newest), "its dataloader is at step 3")


def test_a_restart_drops_the_snapshots_of_the_future_it_left(left, caplog):
    """Restored from step 2 (step 4's data damaged), the run's next steps never meet step 4 again."""
    shm = left / "shm"
    with open(slot_of(shm, 4) / "data.bin", "r+b") as f:
        f.write(b"\xff" * 8)
    run, _ = restart(left, caplog)
    assert run.manager.last_load["from_step"] == 2
    run.train(3)  # trained to 3: step 4's slot is dropped before anything is staged
    assert [row["step"] for row in list_snapshots(shm) if row["committed"]] == [2]
    run.train(4)
    run.manager.close()
    assert [row["step"] for row in list_snapshots(shm) if row["committed"]] == [4, 2]


# --- 4. devices and FIFOs, in a child process with bounded memory ----------------------------------

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # reading /dev/zero would fail here, not swap
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from test_hardening_memory import Run
    from cairn.checkpoint.memory_slots import Slot, list_snapshots, read_progress
    from cairn.cli import main
    base = Path({base!r})
    start = time.perf_counter()
    rows = list_snapshots(base / "shm", checksums=True)
    code = main(["checkpoint", "ls", str(base / "shm"), "--memory", "--checksums"])
    ls_s = time.perf_counter() - start
    run = Run(base, base / "shm")  # a restart: what is not a regular file in a slot is removed, never read
    start = time.perf_counter()
    loaded = bool(run.manager.load())
    load_s = time.perf_counter() - start
    print(json.dumps({{"loaded": loaded, "step": run.train_state.step, "load_s": load_s, "ls_s": ls_s,
                      "code": code, "unusable": [r["unusable"] for r in rows],
                      "problems": [r.get("problems") for r in rows],
                      "progress": read_progress(base / "shm" / "progress-0"),
                      "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
""")


def test_dev_zero_and_fifos_are_refused_at_once_reading_nothing(left):
    shm = left / "shm"
    older, newer = slot_of(shm, 2), slot_of(shm, 4)
    (newer / "COMMITTED").unlink()
    os.mkfifo(newer / "COMMITTED")  # a reader that opened it would wait forever
    (older / "state.pt").unlink()
    (older / "state.pt").symlink_to("/dev/zero")  # a reader that followed it would never stop
    (shm / "progress-0").unlink()
    os.mkfifo(shm / "progress-0")
    child = subprocess.run([sys.executable, "-c", CHILD.format(tests=str(Path(__file__).parent), base=str(left))],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert child.returncode == 0, child.stderr[-3000:]
    out = json.loads(child.stdout.strip().splitlines()[-1])
    assert out["loaded"] is False and out["step"] == 0  # neither snapshot, and no disk step: a fresh start
    assert out["load_s"] < 1.0 and out["ls_s"] < 1.0, out  # refused without waiting or reading
    assert out["maxrss_mb"] < 2000, out
    assert out["code"] == 0 and out["progress"] is None
    assert any("COMMITTED is a FIFO" in (u or "") for u in out["unusable"]), out
    assert any("state.pt is a symbolic link" in p for ps in out["problems"] if ps for p in ps), out
    assert "Traceback" not in child.stderr
    assert f"{newer / 'COMMITTED'} is a FIFO: removed, never followed" in child.stderr
    assert f"{older / 'state.pt'} is a symbolic link: removed, never followed" in child.stderr


# --- 5. crafted records and states: one line, the next snapshot, never a payload -------------------

def _leaf(index: int, **changes):
    def edit(record):
        record["leaves"][index].update(changes)
    return edit


def _first_tensor(record) -> dict:
    return next(leaf for leaf in record["leaves"] if leaf["nbytes"])


CRAFTED_RECORDS = {
    "negative data_bytes": (lambda r: r.update(data_bytes=-1), "data_bytes is '-1'"),
    "empty data_bytes": (lambda r: r.update(data_bytes=""), "data_bytes is ''"),
    "huge data_bytes": (lambda r: r.update(data_bytes=1 << 60), "chunks is not a list of"),
    "negative state_bytes": (lambda r: r.update(state_bytes=-5), "state_bytes is '-5'"),
    "huge state_bytes": (lambda r: r.update(state_bytes=1 << 40), "more than a state.pt holds"),
    "leaves of strings": (lambda r: r.update(leaves=["a", "b"]), "leaf 0 is not an object"),
    "leaves a string": (lambda r: r.update(leaves="abc"), "leaves is not a list"),
    "leaves of lists": (lambda r: r.update(leaves=[[]]), "leaf 0 is not an object"),
    "offset past the end": (lambda r: _first_tensor(r).update(offset=r["data_bytes"]), "lie past data_bytes"),
    "negative offset": (lambda r: _first_tensor(r).update(offset=-4096), "offset is '-4096'"),
    "short nbytes": (lambda r: _first_tensor(r).update(nbytes=_first_tensor(r)["nbytes"] - 4), "nbytes"),
    "huge shape": (lambda r: _first_tensor(r).update(shape=[1 << 40, 1 << 40]), "nbytes"),
    "not a dtype": (lambda r: _first_tensor(r).update(dtype="system"), "is not a torch dtype"),
    "overlapping leaves": (lambda r: [leaf.update(offset=0) for leaf in r["leaves"] if leaf["nbytes"]], "overlaps"),
    "a chunk too few": (lambda r: r["chunks"].pop(), "chunks is not a list of"),
    "a step in a string": (lambda r: r.update(step="4"), "step is '4'"),
    "a step of true": (lambda r: r.update(step=True), "step is 'True'"),
    "no run": (lambda r: r.pop("run"), "run is not an object"),
    "another rank's": (lambda r: r.update(rank=1, world_size=2), "taken on layout"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED_RECORDS))
def test_a_crafted_record_is_one_line_then_the_older_snapshot(left, caplog, case):
    edit, why = CRAFTED_RECORDS[case]
    newest = slot_of(left / "shm", 4)
    edit_record(newest, edit)
    run, warnings = restart(left, caplog)
    assert run.manager.last_load["from_step"] == 2 and run.train_state.step == 2
    one_line_naming(warnings, str(newest), why)


@pytest.mark.parametrize("raw", ["not json", "a list", "deep nesting", "100 MB"])
def test_a_record_that_is_not_one_is_one_line(left, caplog, raw):
    newest = slot_of(left / "shm", 4)
    committed = newest / "COMMITTED"
    if raw == "100 MB":
        with open(committed, "r+b") as f:
            f.truncate(100 << 20)  # sparse: refused by its size, never read
    else:
        committed.write_text({"not json": "{step: 4", "a list": "[4]", "deep nesting": "[" * 200_000}[raw])
    run, warnings = restart(left, caplog)
    assert run.manager.last_load["from_step"] == 2
    one_line_naming(warnings, str(committed))


class Payload:
    def __init__(self, marker: Path, how: str):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "eval":
            return eval, (f"open({str(self.marker)!r}, 'w').close()",)
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("how", ["reduce", "eval", "raw pickle"])
def test_a_state_pt_with_a_payload_never_runs(left, caplog, tmp_path, how):
    """The attacker also fixes state.pt's size and checksum in the record: torch.load
    (weights_only) refuses the payload; one line, the older snapshot; no marker."""
    marker = tmp_path / "pwned"
    newest = slot_of(left / "shm", 4)
    if how == "raw pickle":
        state = pickle.dumps({"train_state": Payload(marker, "reduce")}, protocol=2)
    else:
        buffer = __import__("io").BytesIO()
        torch.save({"train_state": Payload(marker, how)}, buffer)
        state = buffer.getvalue()
    rewrite_state(newest, state)
    run, warnings = restart(left, caplog)
    assert run.manager.last_load["from_step"] == 2
    one_line_naming(warnings, str(newest), "state.pt does not load")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["state.pt cut", "data.bin cut", "state.pt of other values"])
def test_damaged_files_are_one_line_then_the_older_snapshot(left, caplog, damage):
    newest = slot_of(left / "shm", 4)
    if damage == "state.pt cut":
        with open(newest / "state.pt", "r+b") as f:
            f.truncate(10)
        why = "state.pt: 10 bytes, the snapshot recorded"
    elif damage == "data.bin cut":
        with open(newest / "data.bin", "r+b") as f:
            f.truncate(100)
        why = "data.bin: 100 bytes, the snapshot recorded"
    else:
        rewrite_state(newest, edited_state(newest, lambda plain: plain.update(train_state=[1, 2])))
        why = "its state is not this run's"
    run, warnings = restart(left, caplog)
    assert run.manager.last_load["from_step"] == 2
    one_line_naming(warnings, str(newest), why)


def test_ls_memory_says_unusable_per_slot_and_never_fails(left, capsys):
    from cairn.cli import main

    shm = left / "shm"
    older, newer = slot_of(shm, 2), slot_of(shm, 4)
    edit_record(newer, _leaf(0, offset=-1))
    (older / "COMMITTED").write_text("[" * 200_000)
    assert main(["checkpoint", "ls", str(shm), "--memory", "--checksums"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.count("unusable") >= 3 and "offset is '-1'" in out and "Traceback" not in out
    assert main(["checkpoint", "ls", str(shm), "--memory", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["snapshots"]
    assert all(row["unusable"] and row["step"] is None for row in rows)
