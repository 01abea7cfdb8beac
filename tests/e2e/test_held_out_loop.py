"""A loop written from the guide's section 16 alone (held_out_loop.py), SIGKILLed at chosen steps,
loses at most ``interval`` steps each time: with a save in flight at the kill, between saves,
and after a first save slower than the interval (where deferring saves lost five steps of an
interval of two)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from cairn.checkpoint import list_steps
from conftest import REPO

pytestmark = pytest.mark.slow

LOOP = REPO / "tests" / "e2e" / "held_out_loop.py"
INTERVAL = 2


class Loop:
    """One run of the loop, read line by line."""

    def __init__(self, out, env: dict[str, str], step_seconds: float):
        self.out = out
        self.proc = subprocess.Popen(
            [sys.executable, str(LOOP), "--out", str(out), "--steps", "40", "--interval", str(INTERVAL),
             "--step-seconds", str(step_seconds)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **env})
        first = self.proc.stdout.readline().split()
        assert first[:1] == ["resumed"], first
        self.resumed = int(first[1])
        self.done = self.resumed
        self.taken: int | None = None  # the newest step whose save() took a save

    def kill_after(self, step: int, action: str) -> int:
        """SIGKILL right after step ``step``'s save() returned ``action``. Returns the steps of the
        save still being written then (the steps since it began; 0 if none was), which a crash
        loses beyond the interval: a save in flight dies with the process."""
        for line in self.proc.stdout:
            number, what = line.split()[1:3]
            self.done = int(number)
            if what in ("started", "saved"):
                self.taken = self.done
            if self.done == step:
                assert what == action, line
                self.proc.send_signal(signal.SIGKILL)
                break
        self.proc.wait(timeout=60)
        assert self.done == step and self.proc.returncode == -signal.SIGKILL
        on_disk = list_steps(self.out / "checkpoint")
        return 0 if self.taken is None or self.taken in on_disk else self.done - self.taken

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=60)


def test_killed_at_any_step_it_loses_at_most_the_interval(tmp_path):
    """Four runs of the loop on one folder, each killed where a user's job could die; each time
    the next run loses at most the interval (beyond the steps of a save still being written)."""
    # 1. The run's first save commits after 2 s, at 0.3 s a step: the saves of steps 4 and 6 come
    #    due while it is written. By default (when_busy wait) each waits for the one before, so
    #    a kill after step 7 resumes from step 6 (or 4, with 6 in flight); deferring them (the
    #    old default) resumed from step 2, five steps lost.
    first = Loop(tmp_path, {"CAIRN_FAULT": "after_data_before_commit:sleep=2", "CAIRN_FAULT_TIMES": "1"},
                 step_seconds=0.3)
    assert first.resumed == 0
    in_flight = first.kill_after(7, "skipped")
    second = Loop(tmp_path, {"CAIRN_FAULT": "after_data_before_commit:sleep=0.6"}, step_seconds=0.3)
    assert first.done - second.resumed <= INTERVAL + in_flight <= INTERVAL + 1, (first.done, second.resumed)
    # 2. Every save takes 0.6 s to commit: killed right after a save began, with it in flight.
    in_flight = second.kill_after(second.resumed + INTERVAL, "started")
    third = Loop(tmp_path, {"CAIRN_FAULT": "after_data_before_commit:sleep=0.1"}, step_seconds=0.3)
    assert in_flight == 0 and second.done - third.resumed == INTERVAL  # the save before it was committed
    # 3. Killed between two saves.
    in_flight = third.kill_after(third.resumed + INTERVAL + 1, "skipped")
    fourth = Loop(tmp_path, {}, step_seconds=0.0)
    fourth.stop()
    assert third.done - fourth.resumed <= INTERVAL + in_flight <= INTERVAL + 1, (third.done, fourth.resumed)
