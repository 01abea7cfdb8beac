"""What a new user of cairn.checkpoint trips on, from their own loop (issue 25's list): each as
the user would hit it, with real saves and loads on one process (no process group)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from cairn.checkpoint import (
    BackgroundSaver,
    CheckpointConfigError,
    CheckpointError,
    CheckpointManager,
    FolderBusyError,
    LoadResult,
    OptimizerState,
    RNGState,
    list_steps,
    load,
    open_store,
    save,
)
from cairn.checkpoint.lease import FolderLease
from cairn.config.job_config import JobConfig, as_flags
from test_library import Counter, manager_for, tiny, train_step


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def same_next_step(a: tuple[nn.Module, torch.optim.Optimizer], b: tuple[nn.Module, torch.optim.Optimizer]) -> bool:
    """Whether one more step (same data, same dropout) gives both the same loss and the same weights."""
    torch.manual_seed(3)
    loss_a = train_step(*a)
    torch.manual_seed(3)
    loss_b = train_step(*b)
    return loss_a == loss_b and all(torch.equal(value, a[0].state_dict()[key]) for key, value in b[0].state_dict().items())


# --- 1. when a save is due while the previous one is written: the default waits -----------------

def test_the_default_waits_for_a_save_in_flight_and_says_so(tmp_path, monkeypatch, caplog):
    """At the default (when_busy wait) a due save never goes missing: the step waits for the save
    in flight, the result and a warning say how long, and every due step is committed."""
    assert CheckpointManager.Config().when_busy == "wait" and JobConfig().checkpoint.when_busy == "wait"
    model, optimizer = tiny()
    monkeypatch.setenv("CAIRN_FAULT", "after_data_before_commit:sleep=1.0")  # a save slower than 2 steps
    manager = manager_for(tmp_path, model, optimizer, Counter(), async_mode="async", async_writer="thread")
    train_step(model, optimizer, manager)
    manager.prepare_async()
    manager.async_saver.wait()
    assert manager.save(2).action == "started"
    with caplog.at_level(logging.WARNING, logger="cairn"):
        waited = manager.save(4)
    assert waited.action == "started" and waited.waited_s > 0.3 and waited.steps_at_risk == 2
    assert "training waited" in caplog.text and "Config.interval" in caplog.text
    manager.close()
    assert list_steps(tmp_path / "checkpoint") == [2, 4]


# --- 2. load() says what it loaded, the same way for the manager and the plain functions --------

def test_a_loop_resumes_from_what_load_returns(tmp_path):
    """No step counter of the user's own: the result's step is where to go on."""
    model, optimizer = tiny()
    config = CheckpointManager.Config(enable=True, interval=3, last_save_model_only=False)
    states = {"optimizer": OptimizerState(model, optimizer)}
    manager = CheckpointManager(config, model_parts=model, states=states, base_folder=tmp_path)
    first = manager.load()
    assert isinstance(first, LoadResult) and not first and first.step is None and first.tier == "none"
    for step in range((first.step or 0) + 1, 8):
        train_step(model, optimizer, manager)
        manager.save(step)
    manager.close()
    model2, optimizer2 = tiny()
    manager2 = CheckpointManager(config, model_parts=model2, states={"optimizer": OptimizerState(model2, optimizer2)},
                                 base_folder=tmp_path)
    loaded = manager2.load()
    manager2.close()
    assert loaded and loaded.step == 6 and loaded.tier == "disk" and loaded.kind == "full"
    assert loaded.source == str(tmp_path / "checkpoint" / "step-6") and loaded.bytes > 0
    plain = load({"model": tiny()[0]}, tmp_path / "checkpoint")
    assert type(plain) is LoadResult and (plain.step, plain.tier, plain.source) == (6, "disk", loaded.source)


def test_a_memory_restore_says_how_many_steps_were_lost(tmp_path):
    from test_memory import build, train

    model, optimizer, counter, manager = build(tmp_path)
    train(model, optimizer, counter, manager, 5)
    manager.close()  # a crash after step 5: the snapshots stay
    model, optimizer, counter, manager = build(tmp_path)
    loaded = manager.load()
    manager.close()
    assert (loaded.step, loaded.tier, loaded.steps_lost, loaded.kind) == (4, "memory", 1, "full")
    assert loaded.record()["from_step"] == 4 and set(loaded.details["phases_s"]) >= {"agree", "copy"}


# --- 3. the Config is checked when the manager is built ------------------------------------------

def test_a_bad_config_is_one_error_naming_every_field(tmp_path):
    model, _ = tiny()
    bad = CheckpointManager.Config(enable=True, when_busy="Wait", interval=0, keep_latest_k=-1)
    with pytest.raises(CheckpointConfigError) as raised:
        CheckpointManager(bad, model_parts=model, base_folder=tmp_path)
    message = str(raised.value)
    assert message.startswith("invalid CheckpointManager.Config (3 problems)")
    for field in ("Config.when_busy", "Config.interval", "Config.keep_latest_k", "'Wait'", "wait, coalesce, defer"):
        assert field in message, message
    assert isinstance(raised.value, ValueError) and len(raised.value.problems) == 3
    assert not any(tmp_path.iterdir())  # nothing was created
    # a state key to exclude is checked against the states this manager was given
    with pytest.raises(CheckpointConfigError, match="unknown key 'optimizr'; choose from optimizer, data"):
        CheckpointManager(CheckpointManager.Config(enable=True, exclude_from_loading=["optimizr"]), model_parts=model,
                          states={"optimizer": Counter(), "data": Counter()}, base_folder=tmp_path)
    with pytest.raises(CheckpointConfigError, match=r"Config.interval must be of type int \(got '5'\)"):
        CheckpointManager(CheckpointManager.Config(enable=True, interval="5"), model_parts=model, base_folder=tmp_path)


# --- 4. library messages in library words; the trainer's in its flags -----------------------------

def test_messages_name_config_fields_and_the_trainer_reads_them_as_flags(tmp_path):
    model, optimizer = tiny()
    manager = manager_for(tmp_path, model, optimizer, Counter())
    manager.save(2)
    manager.close()
    fewer = CheckpointManager(CheckpointManager.Config(enable=True), model_parts=model,
                              states={"optimizer": OptimizerState(model, optimizer), "ema": Counter()},
                              base_folder=tmp_path)
    with pytest.raises(CheckpointError) as raised:
        fewer.load()
    assert "'ema' is not in the checkpoint" in str(raised.value)
    assert "add it to Config.exclude_from_loading to skip it" in str(raised.value)
    assert "--checkpoint" not in str(raised.value)
    with pytest.raises(FolderBusyError) as busy:
        manager_for(tmp_path, model, optimizer, Counter())
    assert "use another folder (Config.folder)" in str(busy.value) and "--checkpoint" not in str(busy.value)
    fewer.close()
    with pytest.raises(ValueError) as mode:
        BackgroundSaver("pinned")
    assert "'pinned'" in str(mode.value) and "async, async_with_pinned_mem" in str(mode.value)
    assert "'disabled'" in str(mode.value)  # where "no background saves" is said
    assert as_flags(str(raised.value)).count("--checkpoint.exclude_from_loading") == 1
    assert as_flags("Config.load_step=3 (Config.nonsense)") == "--checkpoint.load_step=3 (Config.nonsense)"


# --- 5. one on-disk format ----------------------------------------------------------------------

def test_the_manager_loads_what_the_plain_functions_saved(tmp_path):
    model, optimizer = tiny()
    train_step(model, optimizer)
    counter = Counter()
    counter.step = 9
    save({"model": model, "optimizer": OptimizerState(model, optimizer), "counter": counter, "rng": RNGState()},
         tmp_path / "checkpoint", 9)
    keys = dcp.FileSystemReader(str(tmp_path / "checkpoint" / "step-9")).read_metadata().state_dict_metadata
    assert "0.weight" in keys and not any(key.startswith("model.") for key in keys)  # the model at the top level
    model2, optimizer2 = tiny()
    counter2 = Counter()
    manager = manager_for(tmp_path, model2, optimizer2, counter2)
    loaded = manager.load()
    manager.close()
    assert loaded.step == 9 and counter2.step == 9
    assert all(torch.equal(value, weights(model)[key]) for key, value in model2.state_dict().items())
    assert same_next_step((model, optimizer), (model2, optimizer2))  # the optimizer state came along


def test_the_plain_functions_load_what_the_manager_saved(tmp_path):
    model, optimizer = tiny()
    train_step(model, optimizer)
    manager = manager_for(tmp_path, model, optimizer, Counter())
    manager.save(2)
    manager.close()
    model2, optimizer2 = tiny()
    plain = {"model": model2, "optimizer": OptimizerState(model2, optimizer2)}  # the guide's documented form
    assert load(plain, tmp_path / "checkpoint").step == 2
    assert all(torch.equal(value, weights(model)[key]) for key, value in model2.state_dict().items())
    assert same_next_step((model, optimizer), (model2, optimizer2))
    # a state the checkpoint does not hold, and a model that does not fit, are named before a byte is read
    with pytest.raises(CheckpointError) as raised:
        load({"model": nn.Sequential(nn.Linear(4, 3)), "ema": Counter()}, tmp_path / "checkpoint")
    message = str(raised.value)
    assert "does not match this state dict" in message and "'ema' is not in the checkpoint" in message
    assert "0.weight: checkpoint shape (8, 4) != model shape (3, 4)" in message
    assert "Missing key" not in message


# --- 6 and 9. one process: no torch warning, the unpinned fallback said once ----------------------

def test_one_process_saves_and_loads_without_torch_warnings(tmp_path, caplog):
    model, optimizer = tiny()
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="cairn"):
        warnings.simplefilter("always")
        save({"model": model}, tmp_path / "plain", 1)
        load({"model": model}, tmp_path / "plain")
        saver = BackgroundSaver("async_with_pinned_mem", writer="thread")
        second = BackgroundSaver("async_with_pinned_mem", writer="thread")
        save({"model": model}, tmp_path / "plain", 2, async_saver=saver).result(timeout=60)
        saver.close()
        second.close()
        manager = manager_for(tmp_path, model, optimizer, Counter(), async_mode="async_with_pinned_mem")
        train_step(model, optimizer, manager)
        manager.save(2, last_step=True)
        manager.close()
        again = manager_for(tmp_path, model, optimizer, Counter())
        again.load()
        again.close()
    assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]
    unpinned = [r for r in caplog.records if "unpinned" in r.getMessage()]
    if torch.cuda.is_available():
        assert not unpinned
    else:  # logged once per process: this test's savers, or an earlier test's
        assert len(unpinned) <= 1


def test_the_unpinned_fallback_is_logged_once_per_process():
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from cairn.checkpoint import BackgroundSaver\n"
            "for _ in range(3): BackgroundSaver('async_with_pinned_mem', writer='thread').close()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("staging into ordinary (unpinned) host memory") == 1, out.stderr


# --- 7. section 16 says what the defaults do, and they do it -------------------------------------

def test_the_defaults_section_16_states(tmp_path):
    """base_folder + folder is where steps go; the last step is model-only unless asked otherwise."""
    guide = (Path(__file__).resolve().parents[2] / "docs" / "checkpoint.md").read_text()
    section = guide[guide.index("## 16. Use it from your own loop"):guide.index("## 17.")]
    for said in ("`outputs/checkpoint/step-100`", "**the model only** (`last_save_model_only=True`)",
                 '`"wait"` (default)', "`LoadResult`", "`SaveResult`", "`steps_at_risk`"):
        assert said in section, said
    model, optimizer = tiny()
    manager = CheckpointManager(CheckpointManager.Config(enable=True, interval=2), model_parts=[model],
                                states={"optimizer": OptimizerState(model, optimizer)}, base_folder=tmp_path / "outputs")
    for step in range(1, 4):
        train_step(model, optimizer, manager)
        last = manager.save(step, last_step=step == 3)
    manager.close()
    assert last.action == "saved" and last.kind == "model_only"
    assert list_steps(tmp_path / "outputs" / "checkpoint") == [2, 3]
    assert open_store(tmp_path / "outputs" / "checkpoint").read_manifest(3)["kind"] == "model_only"


# --- 8. a zombie holds no lease -----------------------------------------------------------------

def test_a_killed_unreaped_holder_is_taken_over_at_once(tmp_path, caplog):
    folder = tmp_path / "checkpoint"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom cairn.checkpoint.lease import FolderLease\n"
         "from cairn.checkpoint import open_store\n"
         f"FolderLease.acquire(open_store({str(folder)!r}))\nprint('held', flush=True)\ntime.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        os.kill(holder.pid, signal.SIGKILL)  # killed, and not reaped: a zombie until holder.wait()
        stat = Path(f"/proc/{holder.pid}/stat")
        deadline = time.monotonic() + 10
        while stat.read_bytes().rsplit(b")", 1)[1].split()[0] != b"Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="cairn"):
            lease = FolderLease.acquire(open_store(folder))
        assert time.monotonic() - start < 5 and f"its process {holder.pid} on this host is gone" in caplog.text
        lease.release()
    finally:
        holder.kill()
        holder.wait()
