"""Training with checkpoints in object storage, against a real S3-compatible server on 127.0.0.1:
bit-exact resume in every async mode on 1 and 4 ranks, resharding 4 -> 2, an HF export to s3://
that loads back, the CLI on s3://, a SIGKILL during an upload, the marker write and retention,
and a local folder mirrored to s3:// that survives the loss of the machine."""

from __future__ import annotations

import json
import shutil

import pytest

from cairn.cli import main
from conftest import train
from s3_server import s3  # noqa: F401 - a fixture

pytestmark = pytest.mark.slow

CKPT = ["--checkpoint.enable", "--checkpoint.interval", "4", "--checkpoint.no-last_save_model_only",
        "--checkpoint.when_busy", "wait"]
FOUR = ["--parallelism.data_parallel_shard_degree", "4", "--training.local_batch_size", "1"]


def steps_of(uri: str, capsys) -> list[int]:
    assert main(["checkpoint", "ls", uri, "--json"]) == 0
    return sorted(row["step"] for row in json.loads(capsys.readouterr().out)["steps"] if row["committed"])


@pytest.mark.parametrize("async_mode,nproc", [("disabled", 1), ("async", 1), ("async_with_pinned_mem", 1),
                                              ("async_with_pinned_mem", 4)])
def test_resume_from_object_storage_is_bit_exact(s3, tmp_path, async_mode, nproc, capsys):
    common = [*CKPT, "--training.steps", "12", "--checkpoint.async_mode", async_mode,
              *(FOUR if nproc == 4 else [])]
    whole = train(tmp_path / "whole", *common, "--checkpoint.folder", f"{s3.uri}/whole", nproc=nproc, env=s3.env)
    split_uri = f"{s3.uri}/split"
    train(tmp_path / "split", *common, "--checkpoint.folder", split_uri, "--debug.exit_after_step", "8",
          nproc=nproc, env=s3.env)
    assert steps_of(split_uri, capsys) == [4, 8]
    resumed = train(tmp_path / "split", *common, "--checkpoint.folder", split_uri, nproc=nproc, env=s3.env)
    assert "loaded full checkpoint s3://" in resumed.output
    for step in range(9, 13):
        assert resumed.losses[step] == whole.losses[step], step  # bitwise
    assert main(["checkpoint", "verify", split_uri]) == 0
    assert main(["checkpoint", "diff", f"{s3.uri}/whole/step-12", f"{split_uri}/step-12"]) == 0


def test_a_step_saved_by_four_ranks_reshards_onto_two(s3, tmp_path):
    uri = f"{s3.uri}/reshard"
    train(tmp_path / "four", *CKPT, "--training.steps", "4", "--checkpoint.folder", uri, *FOUR, nproc=4,
          env=s3.env)
    two = train(tmp_path / "two", *CKPT, "--training.steps", "6", "--checkpoint.folder", uri,
                "--parallelism.data_parallel_shard_degree", "2", "--training.local_batch_size", "2", nproc=2,
                env=s3.env)
    assert "loaded full checkpoint" in two.output and "re-seeded per rank" in two.output
    assert max(two.losses) == 6


def test_hf_export_to_object_storage_and_back(s3, tmp_path, capsys):
    uri = f"{s3.uri}/hf"
    train(tmp_path / "a", "--checkpoint.enable", "--checkpoint.interval", "100", "--training.steps", "2",
          "--checkpoint.last_save_model_only", "--checkpoint.last_save_in_hf", "--checkpoint.folder", uri,
          env=s3.env)
    assert steps_of(uri, capsys) == [2]
    assert main(["checkpoint", "verify", f"{uri}/step-2"]) == 0
    capsys.readouterr()
    local = tmp_path / "hf_download"
    assert main(["checkpoint", "convert", f"{uri}/step-2", str(local), "--to", "dcp"]) == 0
    started = train(tmp_path / "b", "--checkpoint.enable", "--training.steps", "1", "--checkpoint.initial_load_in_hf",
                    "--checkpoint.initial_load_path", f"{uri}/step-2", env=s3.env)
    assert "loaded Hugging Face weights from s3://" in started.output
    # the offline conversion scripts, both ends in object storage
    import subprocess
    import sys

    from conftest import REPO

    scripts = REPO / "scripts" / "checkpoint_conversion"
    env = {**__import__("os").environ, **s3.env}
    for command in ([scripts / "convert_from_hf.py", f"{uri}/step-2", f"{s3.uri}/dcp_from_hf", "--quiet"],
                    [scripts / "convert_to_hf.py", f"{s3.uri}/dcp_from_hf", f"{s3.uri}/hf_again", "--model_flavor",
                     "tiny", "--hf_assets_path", str(REPO / "assets" / "tokenizer"), "--quiet"]):
        done = subprocess.run([sys.executable, *map(str, command)], env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert main(["checkpoint", "diff", f"{uri}/step-2", f"{s3.uri}/hf_again"]) == 0


def test_cli_on_object_storage(s3, tmp_path, capsys):
    uri = f"{s3.uri}/cli"
    train(tmp_path, *CKPT, "--training.steps", "8", "--checkpoint.folder", uri, env=s3.env)
    capsys.readouterr()
    assert main(["checkpoint", "ls", uri]) == 0
    out = capsys.readouterr().out
    assert "step" in out.lower() and "full" in out and "2 committed steps" in out
    assert main(["checkpoint", "inspect", f"{uri}/step-8", "--group", "train_state", "--values"]) == 0
    assert "step = 8" in capsys.readouterr().out
    assert main(["checkpoint", "convert", f"{uri}/step-8", f"{uri}-export/model.pt", "--to", "torch"]) == 0
    assert main(["checkpoint", "verify", uri, "--json"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert report["ok"] and len(report["checked"]) == 2
    # a flipped byte: verify names it, exit 1
    key = next(k["Key"] for k in s3.client.list_objects_v2(Bucket=s3.bucket, Prefix="run/cli/step-8/")["Contents"]
               if k["Key"].endswith("__0_0.distcp"))
    raw = bytearray(s3.client.get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    raw[100] ^= 0xFF
    s3.client.put_object(Bucket=s3.bucket, Key=key, Body=bytes(raw))
    assert main(["checkpoint", "verify", f"{uri}/step-8"]) == 1
    assert "__0_0.distcp" in capsys.readouterr().out


@pytest.mark.parametrize("point", ["during_upload", "during_publish", "during_purge"])
def test_a_kill_during_upload_marker_or_retention_leaves_the_previous_step(s3, tmp_path, point, capsys):
    uri = f"{s3.uri}/kill"
    common = [*CKPT, "--training.steps", "12", "--checkpoint.folder", uri, "--checkpoint.keep_latest_k", "1"]
    train(tmp_path, *common, "--debug.exit_after_step", "4", env=s3.env)
    assert steps_of(uri, capsys) == [4]
    env = {**s3.env, "CAIRN_FAULT": point, "CAIRN_S3_PART_MB": "5"}
    killed = train(tmp_path, *common, "--debug.exit_after_step", "8", env=env, check=False)
    assert killed.returncode != 0 and f"CAIRN_FAULT={point}" in killed.output
    expected = [8] if point == "during_purge" else [4]  # the purge's marker delete came first
    assert steps_of(uri, capsys) == expected
    resumed = train(tmp_path, *common, env=s3.env)
    assert f"loaded full checkpoint {uri}/step-{expected[0]}" in resumed.output
    if point != "during_purge":  # what the killed save left: objects no marker names, an unfinished upload
        assert "removed s3://" in resumed.output or "aborted an unfinished upload" in resumed.output
    assert max(resumed.losses) == 12


def test_a_local_folder_mirrored_to_object_storage_survives_the_machine(s3, tmp_path, capsys):
    mirror = f"{s3.uri}/mirror"
    common = [*CKPT, "--training.steps", "12", "--checkpoint.upload_to", mirror]
    whole = train(tmp_path / "whole", *CKPT, "--training.steps", "12")
    train(tmp_path / "run", *common, "--debug.exit_after_step", "8", env=s3.env)
    assert steps_of(mirror, capsys) == [4, 8]
    shutil.rmtree(tmp_path / "run" / "checkpoint")  # the machine and its disk are gone
    resumed = train(tmp_path / "run", *common, env=s3.env)
    assert f"loaded full checkpoint {mirror}/step-8" in resumed.output
    for step in range(9, 13):
        assert resumed.losses[step] == whole.losses[step], step
    assert steps_of(mirror, capsys) == [4, 8, 12]
