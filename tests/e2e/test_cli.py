"""``cairn checkpoint``: every subcommand on checkpoints written by real training runs.

The runs (a seed step, a full DCP step, a model-only bfloat16 step, an HF step) are made
once per module; most commands run in this process through ``cairn.cli.main`` (fast),
the rest through the installed entry points where the process boundary is the point
(exit codes, TTY detection).
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cairn.checkpoint import readers
from cairn.checkpoint.cli import plot as ckpt_plot
from cairn.cli import main
from conftest import REPO, train

pytestmark = pytest.mark.slow

SUBCOMMANDS = ("ls", "inspect", "verify", "diff", "convert", "plot")


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    run, hf_run = root / "run", root / "hf_run"
    seed = train(run, "--checkpoint.enable", "--checkpoint.create_seed_checkpoint")
    trained = train(run, "--checkpoint.enable", "--checkpoint.interval", "3", "--training.steps", "6",
                    "--checkpoint.last_save_model_only", "--checkpoint.export_dtype", "bfloat16")
    train(hf_run, "--checkpoint.enable", "--checkpoint.interval", "100", "--training.steps", "2",
          "--checkpoint.last_save_model_only", "--checkpoint.last_save_in_hf")
    sharded_run = root / "fsdp2"
    train(sharded_run, "--checkpoint.enable", "--checkpoint.interval", "100", "--training.steps", "1",
          "--checkpoint.no-last_save_model_only", "--parallelism.data_parallel_shard_degree", "2",
          "--training.local_batch_size", "2", nproc=2)
    folder = run / "checkpoint"
    return SimpleNamespace(root=root, run=run, hf_run=hf_run, folder=folder, seed=folder / "step-0",
                           full=folder / "step-3", model_only=folder / "step-6",
                           hf=hf_run / "checkpoint" / "step-2", sharded=sharded_run / "checkpoint" / "step-1",
                           seed_log=seed.output, train_log=trained.output)


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main(["checkpoint", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys, *args):
    code, out, err = cli(capsys, *args, "--json")
    return code, json.loads(out)


def flat(text: str) -> str:
    """``text`` with line breaks and indentation collapsed (wrapped lines read as one)."""
    return " ".join(text.split())


def assert_fits_80_columns(text: str) -> None:
    """Every line fits, but a command printed to be copied: it stays whole on a line of its own."""
    long = [line for line in text.splitlines() if len(line) > 80 and not line.startswith("  cairn checkpoint ")]
    assert not long, long


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# --- help and entry points -------------------------------------------------------------------

@pytest.mark.parametrize("args", [[], ["checkpoint"], *[["checkpoint", sub] for sub in SUBCOMMANDS]])
def test_help_of_every_command(capsys, args):
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: cairn" + (f" {' '.join(args)}" if args else ""))
    assert_fits_80_columns(out)
    if len(args) == 2:
        assert "examples:" in out


def test_console_script_and_python_m(tmp_path):
    script = Path(sys.executable).with_name("cairn")
    if script.exists():
        proc = subprocess.run([str(script), "--version"], capture_output=True, text=True)
        assert proc.returncode == 0 and proc.stdout.startswith("cairn ")
    # A real process: a usage error is one line on stderr with status 2, never a traceback.
    proc = subprocess.run([sys.executable, "-m", "cairn", "checkpoint", "verify", str(tmp_path / "nope")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"cairn checkpoint verify: no such file or directory ({tmp_path / 'nope'})"]


def test_missing_subcommand_or_argument_is_a_usage_error(capsys):
    assert main(["checkpoint"]) == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["checkpoint", "diff", "only_one"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("cairn checkpoint diff: the following arguments are required")


# --- ls ------------------------------------------------------------------------------------------

def test_ls_lists_every_step_newest_first(capsys, ckpts):
    code, out, err = cli(capsys, "ls", ckpts.folder)
    assert code == 0 and err == ""
    assert_fits_80_columns(out)
    assert "\x1b[" not in out  # not a terminal: no colours
    rows = [line.split() for line in out.splitlines()[2:5]]
    assert [row[:4] for row in rows] == [["6", "model-only", "yes", "sizes"], ["3", "full", "yes", "sizes"],
                                         ["0", "seed", "yes", "sizes"]]
    assert rows[0][5] == "bf16" and rows[1][5] == "fp32"
    code, listing = cli_json(capsys, "ls", ckpts.run)  # a run's dump folder works too
    steps = {s["step"]: s for s in listing["steps"]}
    assert [s["step"] for s in listing["steps"]] == [6, 3, 0]
    assert {s: steps[s]["kind"] for s in steps} == {6: "model_only", 3: "full", 0: "seed"}
    assert all(s["committed"] and s["status"] == "ok" and s["checked"] == "sizes" for s in steps.values())
    assert steps[3]["layout"]["world_size"] == 1 and steps[3]["dtype"] == "float32"
    assert steps[6]["dtype"] == "bfloat16"
    assert steps[3]["files"] == len(list(ckpts.full.iterdir()))
    assert steps[3]["bytes"] == sum(p.stat().st_size for p in ckpts.full.iterdir())


def test_ls_checksums_and_hf(capsys, ckpts):
    code, listing = cli_json(capsys, "ls", ckpts.hf_run / "checkpoint", "--checksums")
    (step,) = listing["steps"]
    assert (step["step"], step["kind"], step["storage"], step["checked"]) == (2, "hf", "hf", "checksums")
    code, out, _ = cli(capsys, "ls", ckpts.hf_run / "checkpoint", "--checksums")
    assert " HF " in out and "checksummed" in out


def test_ls_shows_leftovers_of_crashed_saves_as_uncommitted(capsys, ckpts, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(ckpts.seed, folder / "step-0")
    (folder / ".tmp-step-5").mkdir()
    (folder / ".tmp-step-5" / "__0_0.distcp").write_bytes(b"x" * 100)
    (folder / "step-4").mkdir()  # a stock DCP save that died before its .metadata
    code, out, _ = cli(capsys, "ls", folder)
    assert code == 0
    assert_fits_80_columns(out)
    assert ".tmp-step-5: staging dir of a save in progress or one that did not finish" in flat(out)
    assert "step-4: no manifest or .metadata" in flat(out)
    code, listing = cli_json(capsys, "ls", folder)
    assert [(s["step"], s["committed"], s["status"]) for s in listing["steps"]] == [
        (5, False, "uncommitted"), (4, False, "uncommitted"), (0, True, "ok")]


# --- inspect ---------------------------------------------------------------------------------------

def test_inspect_full_step(capsys, ckpts):
    code, out, err = cli(capsys, "inspect", ckpts.full)
    assert code == 0, err
    assert_fits_80_columns(out)
    assert "DCP, full checkpoint of step 3" in out and "llama3 tiny" in out
    for heading in ("model (", "optimizer.* (", "lr_scheduler.* (", "dataloader.* (", "train_state.* (", "rng.* ("):
        assert heading in out
    assert "every key is in __0_0.distcp" in out
    code, report = cli_json(capsys, "inspect", ckpts.full)
    entries = {e["key"]: e for e in report["entries"]}
    embedding = entries["tok_embeddings.weight"]
    assert embedding["group"] == "model" and embedding["dtype"] == "float32" and embedding["files"] == ["__0_0.distcp"]
    assert embedding["bytes"] == embedding["shape"][0] * embedding["shape"][1] * 4
    assert entries["optimizer.state.tok_embeddings.weight.exp_avg"]["group"] == "optimizer"
    assert entries["train_state.step"]["type"] == "value"
    groups = report["groups"]
    assert groups["model"]["tensor_bytes"] == sum(e["bytes"] for e in report["entries"]
                                                  if e["group"] == "model" and e["type"] == "tensor")
    assert set(groups) == {"model", "optimizer", "lr_scheduler", "dataloader", "train_state", "rng"}


def test_inspect_values_and_group_filter(capsys, ckpts):
    code, out, _ = cli(capsys, "inspect", ckpts.full, "--group", "train_state", "--values")
    assert code == 0
    assert "  step = 3" in out and "tok_embeddings" not in out
    code, report = cli_json(capsys, "inspect", ckpts.full, "--group", "train_state", "--values")
    assert {e["key"]: e["value"] for e in report["entries"]}["train_state.step"] == 3


def test_inspect_model_only_seed_and_hf(capsys, ckpts):
    code, report = cli_json(capsys, "inspect", ckpts.model_only)
    assert report["kind"] == "model_only" and set(report["groups"]) == {"model"}
    assert {e["dtype"] for e in report["entries"]} == {"bfloat16"}
    code, report = cli_json(capsys, "inspect", ckpts.seed)
    assert report["kind"] == "seed" and report["step"] == 0
    code, out, _ = cli(capsys, "inspect", ckpts.hf)
    assert code == 0
    assert_fits_80_columns(out)
    assert "Hugging Face directory" in out and "LlamaForCausalLM" in out
    assert "model.layers.0.self_attn.q_proj.weight" in out
    code, report = cli_json(capsys, "inspect", ckpts.hf)
    assert report["format"] == "hf" and all(e["files"] == ["model.safetensors"] for e in report["entries"])


def test_a_step_saved_by_two_ranks(capsys, ckpts, tmp_path):
    """FSDP over 2 ranks: the layout is shown, each tensor lies in both ranks' files, reads reassemble it."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    code, listing = cli_json(capsys, "ls", ckpts.sharded.parent)
    assert listing["steps"][0]["layout"]["dp_shard"] == 2
    code, out, _ = cli(capsys, "ls", ckpts.sharded.parent)
    assert "fsdp2" in out
    code, out, _ = cli(capsys, "inspect", ckpts.sharded)
    assert code == 0 and "2 files" in out
    assert_fits_80_columns(out)
    code, report = cli_json(capsys, "inspect", ckpts.sharded)
    files = {e["key"]: e["files"] for e in report["entries"]}
    assert files["tok_embeddings.weight"] == ["__0_0.distcp", "__1_0.distcp"]
    ours, stock = tmp_path / "ours.pt", tmp_path / "stock.pt"
    assert cli(capsys, "convert", ckpts.sharded, ours, "--to", "torch")[0] == 0
    dcp_to_torch_save(ckpts.sharded, stock)
    assert assert_same_tree(torch.load(ours, weights_only=True), torch.load(stock, weights_only=False)) > 30


# --- verify ----------------------------------------------------------------------------------------

def test_verify_sound_steps(capsys, ckpts):
    for path in (ckpts.full, ckpts.model_only, ckpts.seed, ckpts.hf):
        code, out, err = cli(capsys, "verify", path)
        assert (code, err) == (0, ""), out
        assert "every checksum matches" in out
        assert_fits_80_columns(out)
    code, report = cli_json(capsys, "verify", ckpts.folder)
    assert report["ok"] and [Path(v["path"]).name for v in report["checked"]] == ["step-6", "step-3", "step-0"]


def test_verify_names_a_flipped_byte(capsys, ckpts, tmp_path):
    step = tmp_path / "step-3"
    shutil.copytree(ckpts.full, step)
    flip_byte(step / "__0_0.distcp", 5000)
    code, out, _ = cli(capsys, "verify", step)
    assert code == 1
    assert "CORRUPT" in out and "- __0_0.distcp: checksum mismatch" in flat(out)
    assert_fits_80_columns(out)
    assert cli(capsys, "verify", step, "--quick")[0] == 0  # sizes only: the flip is not seen
    code, listing = cli_json(capsys, "ls", tmp_path, "--checksums")
    assert listing["steps"][0]["status"] == "corrupt"


def test_truncated_file_fails_inspect_verify_diff(capsys, ckpts, tmp_path):
    step = tmp_path / "step-6"
    shutil.copytree(ckpts.model_only, step)
    with open(step / "__0_0.distcp", "r+b") as f:
        f.truncate(1000)
    code, out, _ = cli(capsys, "inspect", step)
    assert code == 1 and "CORRUPT" in out and "truncated" in out
    assert cli(capsys, "verify", step)[0] == 1
    code, out, err = cli(capsys, "diff", step, ckpts.model_only)
    assert code == 1
    assert err.startswith(f"cairn checkpoint diff: checkpoint {step} is corrupt") and "Traceback" not in err


# --- user errors: one line, status 2 ------------------------------------------------------------

@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_missing_path(capsys, tmp_path, sub):
    missing = tmp_path / "nope"
    args = {"diff": [missing, missing], "convert": [missing, tmp_path / "out", "--to", "hf"]}.get(sub, [missing])
    code, out, err = cli(capsys, sub, *args)
    assert code == 2 and out == ""
    (line,) = err.splitlines()
    assert line.startswith(f"cairn checkpoint {sub}: no such") and line.endswith(f"({missing})")


@pytest.mark.parametrize("sub", ["inspect", "verify", "diff", "convert"])
def test_not_a_checkpoint(capsys, tmp_path, sub):
    (tmp_path / "notes.txt").write_text("hello")
    args = {"diff": [tmp_path, tmp_path], "convert": [tmp_path, tmp_path / "out", "--to", "hf"]}.get(sub, [tmp_path])
    code, out, err = cli(capsys, sub, *args)
    assert code == 2
    (line,) = err.splitlines()
    assert line.startswith(f"cairn checkpoint {sub}: ") and "not a checkpoint" in line or "no committed" in line


def test_folder_and_step_mixed_up(capsys, ckpts):
    code, _, err = cli(capsys, "inspect", ckpts.folder)
    assert code == 2 and "a checkpoint folder, not a step" in err
    code, _, err = cli(capsys, "ls", ckpts.full)
    assert code == 2 and "a single step, not a checkpoint folder" in err


# --- diff --------------------------------------------------------------------------------------

def test_diff_equal_and_different(capsys, ckpts):
    code, out, _ = cli(capsys, "diff", ckpts.full, ckpts.full)
    assert code == 0 and "EQUAL" in out
    code, out, _ = cli(capsys, "diff", ckpts.full, ckpts.model_only)
    assert code == 1 and "DIFFERENT" in out and "only in a:" in out
    assert_fits_80_columns(out)
    code, report = cli_json(capsys, "diff", ckpts.full, ckpts.model_only, "--only", "model")
    assert code == 1 and not report["equal"]
    keys = {d["key"]: d for d in report["keys"]}
    assert keys["norm.weight"]["dtype_a"] == "float32" and keys["norm.weight"]["dtype_b"] == "bfloat16"
    assert all(d["status"] in ("different", "dtype") for d in keys.values())
    assert all(not k.startswith("optimizer") for k in keys)


def test_diff_atol_decides(capsys, ckpts, tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    assert cli(capsys, "convert", ckpts.model_only, a, "--to", "torch", "--export_dtype", "float32")[0] == 0
    state = torch.load(a, weights_only=True)
    state["norm.weight"] = state["norm.weight"] + 1e-3
    torch.save(state, b)
    code, report = cli_json(capsys, "diff", a, b)
    assert code == 1
    (changed,) = [d for d in report["keys"] if d["status"] != "equal"]
    assert changed["key"] == "norm.weight" and changed["max_abs"] == pytest.approx(1e-3, rel=1e-3)
    assert cli(capsys, "diff", a, b, "--atol", "0.01")[0] == 0


def test_diff_hf_against_dcp_under_cairn_names(capsys, ckpts, tmp_path):
    out_dir = tmp_path / "from_hf"
    assert cli(capsys, "convert", ckpts.hf, out_dir, "--to", "dcp")[0] == 0
    code, out, _ = cli(capsys, "diff", out_dir, ckpts.hf)
    assert code == 0, out


def test_diff_streams_in_batches(capsys, ckpts, monkeypatch):
    monkeypatch.setattr(readers, "READ_BATCH_BYTES", 64 << 10)
    largest = []
    read = readers.DcpCheckpoint.read

    def recording_read(self, keys, into=None):
        keys = list(keys)
        entries = self.entries()
        tensor_bytes = [entries[k].num_bytes for k in keys if entries[k].is_tensor]
        if tensor_bytes:
            largest.append((sum(tensor_bytes), max(tensor_bytes)))
        return read(self, keys, into)

    monkeypatch.setattr(readers.DcpCheckpoint, "read", recording_read)
    assert cli(capsys, "diff", ckpts.full, ckpts.full, "--only", "model,optimizer")[0] == 0
    assert len(largest) > 4
    assert all(total <= 64 << 10 or total == biggest for total, biggest in largest)


# --- convert -----------------------------------------------------------------------------------

def assert_same_tree(x, y, path="") -> int:
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and x.shape == y.shape, path
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True, msg=path)
        return 1
    if isinstance(x, dict):
        assert isinstance(y, dict) and list(x) == list(y), path
        return sum(assert_same_tree(x[k], y[k], f"{path}.{k}") for k in x)
    if isinstance(x, (list, tuple)):
        assert type(x) is type(y) and len(x) == len(y), path
        return sum(assert_same_tree(p, q, f"{path}[{i}]") for i, (p, q) in enumerate(zip(x, y)))
    assert type(x) is type(y) and x == y, path
    return 0


def test_convert_to_torch_matches_stock_dcp_to_torch(capsys, ckpts, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    for step in (ckpts.full, ckpts.model_only):
        ours, stock = tmp_path / f"{step.name}.pt", tmp_path / f"{step.name}-stock.pt"
        code, out, err = cli(capsys, "convert", step, ours, "--to", "torch")
        assert code == 0, err
        dcp_to_torch_save(step, stock)
        assert assert_same_tree(torch.load(ours, weights_only=True), torch.load(stock, weights_only=False)) > 30
        with zipfile.ZipFile(ours) as archive:
            assert archive.testzip() is None  # every record's CRC matches its bytes
        assert cli(capsys, "verify", ours)[0] == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_convert_round_trips(capsys, ckpts, tmp_path):
    hf = tmp_path / "hf"
    code, out, err = cli(capsys, "convert", ckpts.model_only, hf, "--to", "hf")
    assert code == 0, err
    assert (hf / "config.json").is_file() and (hf / "tokenizer.json").is_file()  # tokenizer from the manifest
    assert cli(capsys, "diff", ckpts.model_only, hf)[0] == 0  # bf16 kept, names and layouts mapped back
    back = tmp_path / "back"
    assert cli(capsys, "convert", hf, back, "--to", "dcp")[0] == 0
    assert cli(capsys, "diff", ckpts.model_only, back)[0] == 0
    full_pt, full_dcp = tmp_path / "full.pt", tmp_path / "full_dcp"
    assert cli(capsys, "convert", ckpts.full, full_pt, "--to", "torch")[0] == 0
    assert cli(capsys, "convert", full_pt, full_dcp, "--to", "dcp")[0] == 0
    assert cli(capsys, "diff", ckpts.full, full_dcp)[0] == 0
    hf_pt = tmp_path / "hf.pt"
    assert cli(capsys, "convert", ckpts.hf, hf_pt, "--to", "torch")[0] == 0
    assert "tok_embeddings.weight" in torch.load(hf_pt, weights_only=True)


def test_convert_refuses_to_overwrite(capsys, ckpts, tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    code, _, err = cli(capsys, "convert", ckpts.model_only, target, "--to", "hf")
    assert code == 2 and err.startswith("cairn checkpoint convert: already exists")
    assert (target / "keep.txt").read_text() == "mine"
    code, _, err = cli(capsys, "convert", ckpts.full, tmp_path / "x", "--to", "dcp")
    assert code == 2 and "already a dcp checkpoint" in err and "--export_dtype" in err


def test_convert_dcp_to_dcp_recasts_and_keeps_the_model_only(capsys, ckpts, tmp_path):
    """A smaller copy of a full step: --export_dtype re-casts floating tensors, --model_only drops
    the optimizer, data and RNG state; the rest is kept as it is and loads."""
    half = tmp_path / "half"
    code, out, err = cli(capsys, "convert", ckpts.full, half, "--to", "dcp", "--export_dtype", "bfloat16")
    assert code == 0, err
    _, source = cli_json(capsys, "inspect", ckpts.full)
    _, copy = cli_json(capsys, "inspect", half)
    before = {e["key"]: e for e in source["entries"]}
    after = {e["key"]: e for e in copy["entries"]}
    assert after.keys() == before.keys()
    for key, entry in after.items():
        if entry["type"] == "tensor":
            floating = before[key]["dtype"] in ("float32", "bfloat16", "float16")
            cast = floating and (entry["group"] == "model" or (entry["group"] == "optimizer"
                                                               and not key.endswith(".step")))
            assert entry["dtype"] == ("bfloat16" if cast else before[key]["dtype"]), key
            assert entry["shape"] == before[key]["shape"], key
    model_only = tmp_path / "model_only"
    assert cli(capsys, "convert", ckpts.full, model_only, "--to", "dcp", "--model_only")[0] == 0
    _, small = cli_json(capsys, "inspect", model_only)
    assert {e["group"] for e in small["entries"]} == {"model"}
    assert cli(capsys, "diff", ckpts.full, model_only, "--only", "model")[0] == 0  # float32 kept as it was
    code, _, err = cli(capsys, "diff", ckpts.full, half, "--only", "model", "--atol", "0.05")
    assert code == 1 and "dtype" in err + _  # bf16 now: reported as a dtype change


# --- plot --------------------------------------------------------------------------------------

def test_plot_writes_a_picture(capsys, ckpts, tmp_path):
    import matplotlib.image

    out = tmp_path / "loss.png"
    code, stdout, err = cli(capsys, "plot", ckpts.run, ckpts.hf_run, "-o", out)
    assert code == 0, err
    assert "2 run(s)" in stdout and "checkpoint save(s) marked" in stdout
    image = matplotlib.image.imread(out)
    height, width = image.shape[:2]
    assert width >= 800 and height >= 400
    assert float(image[..., :3].std()) > 0.05  # lines, markers and text, not a blank canvas


def test_plot_reads_saves_and_resumes(tmp_path):
    lines = [{"step": s, "loss": 10.0 - s} for s in range(1, 7)]
    lines.insert(3, {"event": "checkpoint_save", "step": 3, "kind": "full"})
    lines += [{"event": "checkpoint_load", "step": 3, "kind": "full", "from_step": 3},
              {"step": 4, "loss": 6.5}, {"step": 5, "loss": 5.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    run = ckpt_plot.load_run(tmp_path, "loss")
    assert run.saves == [(3, "full")] and run.resumes == [3]
    assert run.points[4] == 6.5 and run.points[6] == 4.0  # a re-run step: the later value


# --- colours -----------------------------------------------------------------------------------

def run_in_terminal(args: list[str], env: dict[str, str]) -> str:
    """Output of a command whose stdout is a pseudo-terminal."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(args, stdout=follower, stderr=subprocess.PIPE, env=env, cwd=REPO)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    proc.wait(timeout=120)
    os.close(leader)
    return b"".join(chunks).decode()


def test_colours_only_on_a_terminal(capsys, ckpts):
    assert "\x1b[" not in cli(capsys, "ls", ckpts.folder)[1]
    assert "\x1b[32m" in cli(capsys, "ls", ckpts.folder, "--color", "always")[1]
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    command = [sys.executable, "-m", "cairn", "checkpoint", "ls", str(ckpts.folder)]
    assert "\x1b[32m" in run_in_terminal(command, env)
    assert "\x1b[" not in run_in_terminal(command, {**env, "NO_COLOR": "1"})


# --- training logs -----------------------------------------------------------------------------

def test_training_logs_say_what_where_how_much_how_long(ckpts):
    log = ckpts.train_log
    assert f"checkpoint step 3: full save of 6.1 MB to {ckpts.full}, training stalled" in log
    assert f"checkpoint step 6: model_only save of 1.0 MB to {ckpts.model_only}" in log
    assert f"loaded seed checkpoint {ckpts.seed}: 2.0 MB in" in log
    events = [json.loads(line) for line in (ckpts.run / "metrics.jsonl").read_text().splitlines()
              if '"event"' in line]
    startup = [e for e in events if e["event"] == "startup"]  # one record of where the start's time went
    assert len(startup) == 1 and startup[0]["step"] == 1 and startup[0]["restart_count"] == 0, startup
    events = [e for e in events if e["event"] != "startup"]
    assert [(e["event"], e["step"], e["kind"]) for e in events] == [
        ("checkpoint_load", 0, "seed"), ("checkpoint_save", 3, "full"), ("checkpoint_save", 6, "model_only")]
    assert all(e["bytes"] > 0 for e in events)


def test_ls_memory_lists_a_nodes_snapshots_and_finds_a_damaged_one(capsys, tmp_path):
    """`ls FOLDER --memory`: a run's snapshots (kept by a run that stopped early), committed and
    checked; a damaged byte makes its slot 'corrupt', named; a missing folder is a usage error."""
    shm = tmp_path / "shm"
    train(tmp_path / "run", "--checkpoint.enable", "--training.steps", "8", "--checkpoint.memory_interval", "2",
          "--checkpoint.memory_dir", str(shm), "--debug.exit_after_step", "5")
    code, out, _ = cli(capsys, "ls", str(shm), "--memory")
    assert code == 0 and "committed" in out and "trained to: rank 0 step 5" in out
    assert [line.split()[0] for line in out.splitlines()[2:4]] == ["4", "2"]  # newest first
    code, listing = cli_json(capsys, "ls", str(shm), "--memory", "--checksums")
    assert code == 0 and [(s["step"], s["holder"], s["problems"]) for s in listing["snapshots"]] == [(4, "rank-0", []),
                                                                                        (2, "rank-0", [])]
    damaged = Path(next(s["path"] for s in listing["snapshots"] if s["step"] == 2)) / "data.bin"
    with open(damaged, "r+b") as f:
        f.seek(100)
        value = f.read(1)[0]
        f.seek(100)
        f.write(bytes([value ^ 1]))
    code, out, _ = cli(capsys, "ls", str(shm), "--memory", "--checksums")
    assert code == 0 and "corrupt" in out and "rank-0/slot-0/data.bin: checksum mismatch" in flat(out)
    code, _, err = cli(capsys, "ls", str(tmp_path / "nowhere"), "--memory")
    assert code == 2 and "nowhere" in err and "memory_dir" in err
