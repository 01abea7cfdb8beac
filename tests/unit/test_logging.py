"""Log lines name their rank once: cairn's prefix only where torchrun does not add its own."""

from __future__ import annotations

import logging
import re
import sys

import pytest

from cairn.trainer import setup_logging


@pytest.fixture
def root_logging():
    """setup_logging replaces the root handlers (``force=True``): put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level


def _line(root: logging.Logger) -> str:
    return root.handlers[0].format(logging.makeLogRecord({"msg": "hello", "levelname": "INFO"}))


def _worker_log_dir(tmp_path, monkeypatch):
    """What torchrun's ``--tee``/``--redirects`` leave a worker: a folder of its own, named in its env."""
    folder = tmp_path / "attempt_0" / "0"
    folder.mkdir(parents=True)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(folder / "error.json"))
    return folder


def test_stderr_captured_by_torchrun_gets_no_prefix_of_ours(tmp_path, monkeypatch, root_logging):
    folder = _worker_log_dir(tmp_path, monkeypatch)
    with open(folder / "stderr.log", "w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        setup_logging(0, "info")
    assert re.fullmatch(r"\d\d:\d\d:\d\d INFO hello", _line(root_logging))


@pytest.mark.parametrize("where", ["inherited", "another file", "not torchrun"])
def test_stderr_torchrun_does_not_capture_is_prefixed(where, tmp_path, monkeypatch, root_logging):
    folder = _worker_log_dir(tmp_path, monkeypatch)
    (folder / "stderr.log").touch()  # the rank's log file, but stderr is not open on it
    if where == "not torchrun":
        monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    with open(tmp_path / "elsewhere.log", "w") as other:
        if where == "another file":
            monkeypatch.setattr(sys, "stderr", other)
        setup_logging(3, "info")
    assert re.fullmatch(r"\[rank3\] \d\d:\d\d:\d\d INFO hello", _line(root_logging))


def test_the_checkpoint_librarys_field_names_read_as_flags(tmp_path, monkeypatch, root_logging):
    """The library logs ``Config.interval``; a trainer's user typed ``--checkpoint.interval``."""
    with open(tmp_path / "stderr.log", "w") as stderr:
        monkeypatch.setattr(sys, "stderr", stderr)
        setup_logging(0, "info")
        logging.getLogger("cairn").warning("raise Config.interval (%d steps), not Config.%s", 2, "nonsense")
    assert (tmp_path / "stderr.log").read_text().rstrip().endswith(
        "raise --checkpoint.interval (2 steps), not Config.nonsense")
