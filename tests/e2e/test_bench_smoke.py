"""benchmarks/checkpoint_bench.py on the tiny flavor: every figure and ratio lands in its JSON.

Values are not checked (a CPU under test load says nothing about checkpoint speed); that
each one is produced, by the real Trainer and CheckpointManager, on 1 process and on 2
gloo processes under torchrun, is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

BENCH = str(REPO / "benchmarks" / "checkpoint_bench.py")
# --drop-caches never: evict only the benchmark's own files, not the page cache of the tests
# running beside it.
QUICK = ["--flavor", "tiny", "--config", "llama3_tiny", "--steps", "2", "--saves", "2", "--rss-saves", "3",
         "--warmup", "1", "--loads", "1", "--ceiling-mb", "4", "--max-window-steps", "20", "--drop-caches", "never"]
RATIOS = ("stall_over_sync_save", "staging_efficiency", "persist_efficiency", "load_efficiency",
          "new_pinned_allocations_after_2nd_save", "rss_growth_pct", "pinned_over_shard",
          "save_checksum_overhead", "load_checksum_overhead", "stall_vs_torchtitan", "durable_vs_torchtitan")
# Present whatever the machine: the torchtitan pair has a value only where torchtitan imports.
ALWAYS_VALUED = tuple(r for r in RATIOS if not r.endswith("torchtitan"))


def run_bench(tmp_path, nproc: int, extra: tuple[str, ...] = ()) -> dict:
    out = tmp_path / "bench.json"
    args = [BENCH, *QUICK, "--folder", str(tmp_path / "ckpt"), "--out", str(out), *extra]
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                    "--nproc_per_node", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*launcher, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert "ratios:" in proc.stdout and "stall_over_sync_save" in proc.stdout  # the printed table
    assert "async_with_pinned_mem stall per save:" in proc.stdout and "step-time drift" in proc.stdout
    assert not (tmp_path / "ckpt").exists()  # cleaned up without --keep
    return json.loads(out.read_text())


def check_report(report: dict, world: int) -> None:
    assert report["host"]["world_size"] == world
    copy, disk = report["ceilings"]["copy"], report["ceilings"]["disk"]
    assert len(copy["per_rank"]) == world and copy["together_gbps_per_rank_min"] > 0
    for key in ("rank0_alone", "all_ranks"):
        assert disk[key]["write_fsync_gbps"] > 0 and disk[key]["cold_read_gbps"] > 0
    assert disk["cache_drop"] == "posix_fadvise(DONTNEED)"

    cairn = report["cairn"]
    for mode in ("disabled", "async", "async_with_pinned_mem"):
        result = cairn[mode]
        assert "error" not in result, result.get("error")
        for key in ("baseline_step_s", "blocked_s", "stall_s", "durable_s", "disk_bytes"):
            assert result[key] is not None, (mode, key)
        assert len(result["stall_s_per_save"]) == 2
        if mode != "disabled":
            assert result["stage_s_from_2nd"] is not None, mode
            # how far step-time drift alone moves one save's stall estimate, from the baseline steps
            assert result["stall_noise_s"] >= 0 and len(result["baseline_step_quartiles_s"]) == 3, mode
            # the phases of an async save; the files are written by the writer process
            assert {"queued", "gate", "staged", "data_start", "data_done", "done"} <= result["timeline"].keys()
    assert cairn["disabled"]["durable_s_without_checksums"] is not None
    # one unmeasured sync save first: the checksum pairs and the sync save time start warm
    assert len(cairn["disabled"]["warmup_durable_s"]) == 2 and min(cairn["disabled"]["warmup_durable_s"]) > 0
    assert cairn["disabled"]["checksum_ratio_per_pair"]
    # the sync save is written in this process: its writer's wait on the hash is measured
    assert cairn["disabled"]["hash_wait_s"] >= 0
    memory = cairn["memory"]
    assert memory["saves"] == 3 and len(memory["per_rank"]) == world
    # allocated before the first save (as a run does after its first step), never again
    assert memory["per_rank"][0]["new_buffer_allocations_per_save"] == [0, 0, 0]
    assert memory["per_rank"][0]["buffer_bytes"] >= memory["per_rank"][0]["shard_bytes"]
    assert cairn["load"]["load_s"] > 0 and cairn["load"]["load_verify_s"] > 0
    assert len(cairn["load"]["verify_ratio_per_pair"]) == len(cairn["load"]["load_s_all"])
    assert all(wait >= 0 for wait in cairn["load"]["verify_hash_wait_s"])
    assert {"state_dict", "check", "read", "restore"} <= cairn["load"]["phases"][0].keys()
    reshard = cairn["reshard"]
    assert "error" not in reshard, reshard.get("error")
    assert reshard["load_s"] > 0 and reshard["layout"] != report["config"]["layout"]

    titan = report["torchtitan"]
    assert titan["available"] or titan["reason"]
    for name in RATIOS:
        ratio = report["ratios"][name]
        assert {"value", "target", "pass", "meaning"} <= ratio.keys(), name
        if name in ALWAYS_VALUED:
            assert ratio["value"] is not None, name


def test_bench_one_process(tmp_path):
    variant = "async_with_pinned_mem+thread"
    report = run_bench(tmp_path, 1, ("--modes", f"disabled,async,async_with_pinned_mem,{variant}"))
    check_report(report, world=1)
    thread = report["cairn"][variant]
    assert "error" not in thread and thread["stall_s"] is not None
    assert "staged" in thread["timeline"] and "data_start" not in thread["timeline"]  # written by a thread
    assert report["ratios"]["stall_over_sync_save[thread]"]["value"] is not None


def test_bench_two_gloo_processes(tmp_path):
    report = run_bench(tmp_path, 2)
    check_report(report, world=2)
    assert report["config"]["layout"]["dp_shard"] == 2
    assert report["cairn"]["reshard"]["layout"]["tp"] == 2  # loaded as TP 2 instead of FSDP 2


def test_storage_bench_smoke(tmp_path):
    """benchmarks/storage_bench.py on 8 MB: saves, cold and warm loads, every reader."""
    out = tmp_path / "storage.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "storage_bench.py"), "--folder",
                           str(tmp_path / "sb"), "--gb", "0.008", "--threads", "1", "--repeats", "1",
                           "--drop-caches", "never", "--out", str(out)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert set(report["loads"]) == {"cairn", "cairn+verify", "stock"}
    assert set(report["warm_loads"]) == {"cairn", "cairn/torch.load", "stock"}
    assert all(row["gbps"] > 0 for row in report["warm_loads"].values())


def test_writeback_bench_smoke(tmp_path):
    """benchmarks/writeback_bench.py: 1 and 2 writer processes, both variants; a bad flag is named."""
    out = tmp_path / "writeback.json"
    script = str(REPO / "benchmarks" / "writeback_bench.py")
    proc = subprocess.run([sys.executable, script, "--folder", str(tmp_path / "wb"), "--writers", "1,2",
                           "--gb-per-writer", "0.02", "--repeats", "2", "--drop-caches", "never", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert set(report["writers"]) == {"1", "2"}
    for row in report["writers"].values():
        assert row["gbps_writeback"] > 0 and row["gbps_plain"] > 0 and len(row["time_ratio_per_repeat"]) == 2
    assert not (tmp_path / "wb").exists()  # its files are removed
    bad = subprocess.run([sys.executable, script, "--writers", "two"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--writers" in bad.stderr
    off = subprocess.run([sys.executable, script, "--folder", str(tmp_path / "wb")], cwd=REPO, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "CAIRN_WRITEBACK_MB": "0"})
    assert off.returncode == 2 and "CAIRN_WRITEBACK_MB" in off.stderr


def test_copy_probe_smoke(tmp_path):
    """benchmarks/copy_probe.py: a rate per buffer size and round; a buffer below one call is refused."""
    out = tmp_path / "probe.json"
    script = str(REPO / "benchmarks" / "copy_probe.py")
    proc = subprocess.run([sys.executable, script, "--file", str(tmp_path / "probe.bin"), "--gb", "0.02",
                           "--buffers", "8,16", "--repeats", "2", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rates = json.loads(out.read_text())["gbps_by_buffer_mib"]
    assert set(rates) == {"8", "16"} and all(len(v) == 2 and min(v) > 0 for v in rates.values())
    bad = subprocess.run([sys.executable, script, "--buffers", "4"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--buffers" in bad.stderr


def run_stall(tmp_path, *variants: str) -> tuple[str, dict]:
    """benchmarks/run_stall.py on the tiny config, 12 steps: (its table, its figures by variant)."""
    out = tmp_path / "stall.json"
    command = [sys.executable, str(REPO / "benchmarks" / "run_stall.py"), "--out", str(out), "--folder",
               str(tmp_path / "runs"), "--window", "3:10", *variants, "--", "--config", "llama3_tiny",
               "--training.steps", "12"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert not (tmp_path / "runs").exists()
    return proc.stdout, json.loads(out.read_text())["figures"]


def test_run_stall_reads_the_runs_own_metrics(tmp_path):
    """benchmarks/run_stall.py: every variant's window, extra time per save and save records, from
    the metrics.jsonl of real run_train.sh runs (figures unchecked: a CPU under test load)."""
    table, figures = run_stall(tmp_path, "--interval", "4", "--only", "pinned_keep1,sync_keep1")
    assert "extra/ckpt" in table
    assert set(figures) == {"none", "pinned_keep1", "sync_keep1"}
    for name in ("pinned_keep1", "sync_keep1"):
        assert figures[name]["window_s"] > 0 and figures[name]["extra_s"] is not None
        assert [save["step"] for save in figures[name]["saves"]] + [d["step"] for d in figures[name]["deferred"]]
        assert all(save["stall_s"] is not None for save in figures[name]["saves"])


def test_run_stall_when_busy_sweep(tmp_path):
    """run_stall.py --when-busy: one run per mode, each with the steps a crash would lose."""
    table, figures = run_stall(tmp_path, "--interval", "2", "--when-busy", "coalesce")
    assert "at risk max" in table
    assert set(figures) == {"none", "when_busy_coalesce"}
    assert figures["when_busy_coalesce"]["at_risk_max"] >= 1 and figures["when_busy_coalesce"]["extra_s"] is not None
    assert all(save["action"] in ("started", "saved") for save in figures["when_busy_coalesce"]["saves"])
    assert figures["none"]["at_risk_max"] is None


def test_when_busy_bench_smoke(tmp_path):
    """benchmarks/when_busy_bench.py on a tiny MLP: every mode's throughput and steps at risk."""
    out = tmp_path / "when_busy.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "when_busy_bench.py"), "--out", str(out),
                           "--width", "64", "--layers", "2", "--steps", "8", "--warmup", "2", "--repeats", "1",
                           "--commit-delay", "0.2", "--folder", str(tmp_path / "runs")],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"wait", "coalesce", "defer"}
    for row in summary.values():
        assert row["throughput"] > 0 and row["at_risk_max"] >= 1 and row["committed"]


def test_s3_bench_smoke(tmp_path):
    """benchmarks/s3_bench.py on 16 MB against the test server it starts: every figure and ratio."""
    out = tmp_path / "s3.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "s3_bench.py"), "--gb", "0.016", "--tensor-mb",
                           "4", "--repeats", "1", "--connections", "2", "--out", str(out)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert set(report["ceilings"]) == {"1", "2"}
    assert all(v["put_gbps"] > 0 and v["get_gbps"] > 0 for v in report["ceilings"].values())
    assert all(report["cairn"][k] > 0 for k in ("save_gbps", "load_verify_gbps", "load_gbps"))
    assert report["dcp_fsspec"]["save_gbps"] > 0 and report["dcp_fsspec"]["load_gbps"] > 0
    assert set(report["ratios"]) == {"cairn_save_over_put_ceiling", "cairn_load_over_get_ceiling",
                                     "cairn_plain_load_over_get_ceiling", "put_ceiling_n_over_1",
                                     "get_ceiling_n_over_1", "cairn_over_fsspec_save", "cairn_over_fsspec_load"}
    assert all(v > 0 for v in report["ratios"].values())
    assert {k: len(v) for k, v in report["rounds"].items()} == {
        "save_over_put": 1, "load_over_get": 1, "plain_load_over_get": 1}  # one round a repeat
    assert set(report["small_requests_ms"]) == {"get_100B", "get_10kB", "head", "put_100B", "list"}
    assert all(v > 0 for v in report["small_requests_ms"].values())


def test_restart_bench_smoke(tmp_path):
    """benchmarks/restart_bench.py: a run killed with SIGKILL after a memory snapshot and after a
    disk save, restarted by torchrun, each phase of the restart and the goodput from run_stall's costs."""
    stall = tmp_path / "stall.json"
    snapshots = "--checkpoint.enable --checkpoint.interval 1000 --checkpoint.memory_interval 2"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "run_stall.py"), "--out", str(stall), "--folder",
                           str(tmp_path / "rs"), "--window", "2:8", "--variant", "none=",
                           "--variant", f"memory_k2={snapshots}", "--", "--config", "llama3_tiny",
                           "--training.steps", "9"],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert json.loads(stall.read_text())["figures"]["memory_k2"]["snapshots"]
    out = tmp_path / "restart.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "restart_bench.py"), "--out", str(out),
                           "--folder", str(tmp_path / "rb"), "--interval", "2", "--kill-after", "1",
                           "--only", "memory,disk_cold", "--stall-json", str(stall), "--cost", "memory=memory_k2",
                           "--", "--config", "llama3_tiny", "--training.steps", "400"],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(out.read_text())
    memory, disk = report["tiers"]["memory"], report["tiers"]["disk_cold"]
    assert memory["tier"] == "memory" and disk["tier"] == "disk", report
    for row in (memory, disk):
        assert row["returncode"] == 0 and row["steps_lost"] >= 0 and row["from_step"] >= 2
        assert all(row[k] > 0 for k in ("init_s", "restore_s", "first_step_s", "total_s"))
    assert 0 < report["goodput"]["memory"]["best"]["goodput"] <= 1
    assert not (tmp_path / "rb").exists()


def test_recovery_bench_smoke(tmp_path):
    """benchmarks/recovery_bench.py, both halves on the tiny model: the snapshot cost of K=2 from
    two runs' windows, then a worker SIGKILLed under torchrun, the whole job killed and run again,
    and a cold restart from disk, each read from metrics.jsonl into issue #27's keys."""
    out = tmp_path / "recovery.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "recovery_bench.py"), "--out", str(out),
                           "--folder", str(tmp_path / "rb"), "--ks", "2", "--window", "2:8", "--interval", "4",
                           "--k", "2", "--kill-after-step", "5", "--steps-after", "3", "--", "--config", "llama3_tiny"],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert "error" not in report["restarts"], report["restarts"]
    assert isinstance(report["snapshot_cost"]["2"], float)
    for key in ("restore_s", "worker_crash_to_first_step_s", "job_kill_to_first_step_s",
                "cold_disk_restart_to_first_step_s", "cold_disk_load_s", "slowest_step_after_restart_over_median"):
        assert report[key] > 0, key
    assert report["restore_bytes"] > 0 and report["k"] == 2 and 0 <= report["steps_lost"] <= 2
    restarts = report["restarts"]
    assert restarts["worker_crash"]["load"]["tier"] == "memory" and restarts["job_kill"]["load"]["tier"] == "memory"
    assert restarts["cold_disk"]["load"]["tier"] == "disk"
    assert restarts["worker_crash"]["startup"]["restart_count"] == 1
    assert not (tmp_path / "rb").exists()
