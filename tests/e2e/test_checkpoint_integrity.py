"""Auto-resume on a corrupt newest step: a clear stop, or a logged fallback when asked."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from conftest import train

pytestmark = pytest.mark.slow

COMMON = ["--checkpoint.enable", "--checkpoint.no-last_save_model_only", "--checkpoint.interval", "3",
          "--training.steps", "9", "--checkpoint.keep_latest_k", "0"]


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """A run stopped after step 6 (steps 3 and 6 committed), and the uninterrupted reference."""
    base = tmp_path_factory.mktemp("integrity")
    train(base / "run", *COMMON, "--debug.exit_after_step", "6")
    reference = train(base / "ref", *COMMON)
    return base / "run", reference


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _data_file(step_dir):
    return next(p for p in sorted(step_dir.iterdir()) if p.suffix == ".distcp")


def test_truncated_newest_step_stops_with_the_file_and_the_way_out(six_steps, tmp_path):
    run = _copy(six_steps[0], tmp_path / "run")
    victim = _data_file(run / "checkpoint" / "step-6")
    with open(victim, "r+b") as f:
        f.truncate(victim.stat().st_size // 2)
    before = hashlib.sha256((run / "checkpoint" / "step-3" / victim.name).read_bytes()).hexdigest()
    result = train(run, *COMMON, check=False)
    assert result.returncode != 0
    assert victim.name in result.output
    assert "--checkpoint.load_step=3" in result.output  # the library names Config.load_step; the trainer, its flag
    after = hashlib.sha256((run / "checkpoint" / "step-3" / victim.name).read_bytes()).hexdigest()
    assert before == after  # nothing saved was touched


def test_fallback_on_corrupt_resumes_from_the_previous_step(six_steps, tmp_path):
    run = _copy(six_steps[0], tmp_path / "run")
    (_data_file(run / "checkpoint" / "step-6")).unlink()
    result = train(run, *COMMON, "--checkpoint.fallback_on_corrupt")
    assert "falling back to step-3" in result.output
    reference = six_steps[1]
    for step in range(4, 10):
        assert result.losses[step] == reference.losses[step], step  # bit-exact from step 3


def test_fallback_on_corrupt_passes_a_damaged_manifest(six_steps, tmp_path):
    """A byte flipped in the newest step's manifest: one logged line naming it, then step 3."""
    run = _copy(six_steps[0], tmp_path / "run")
    manifest = run / "checkpoint" / "step-6" / "cairn_manifest.json"
    data = bytearray(manifest.read_bytes())
    data[len(data) // 2] ^= 0x01
    manifest.write_bytes(bytes(data))
    result = train(run, *COMMON, "--checkpoint.fallback_on_corrupt")
    lines = [line for line in result.output.splitlines() if "falling back to step-3" in line]
    assert len(lines) == 1 and str(manifest) in lines[0] and "Traceback" not in result.output
    reference = six_steps[1]
    for step in range(4, 10):
        assert result.losses[step] == reference.losses[step], step


def test_verify_catches_a_flipped_byte(six_steps, tmp_path):
    run = _copy(six_steps[0], tmp_path / "run")
    victim = _data_file(run / "checkpoint" / "step-6")
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x01
    victim.write_bytes(bytes(data))
    result = train(run, *COMMON, "--checkpoint.verify", check=False)
    assert result.returncode != 0
    assert victim.name in result.output and "checksum" in result.output.lower()
