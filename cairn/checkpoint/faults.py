"""Fault injection for the crash tests: die (or fail) at a named point of a save.

``CAIRN_FAULT=<point>`` SIGKILLs the process at that point (in the writer process of an async
save: it and the training process), ``CAIRN_FAULT=<point>:enospc`` raises
``OSError(ENOSPC)`` there instead, ``CAIRN_FAULT=<point>:exit`` ends only the process that
reaches it (exit code 99), ``CAIRN_FAULT=<point>:sleep=<s>`` sleeps there (a slow disk, a
slow purge), ``CAIRN_FAULT=<point>:stop`` stops the process there with SIGSTOP (as a
debugger or a hung filesystem would; SIGCONT continues it), ``CAIRN_FAULT_RANK=<r>`` limits it to one rank, ``CAIRN_FAULT_SKIP=<n>`` lets
each process pass the point ``n`` times before it acts, and ``CAIRN_FAULT_TIMES=<n>`` lets it act
``n`` times at most (a slow first save, then normal ones). Points: ``before_data``
(staging dir made, nothing written), ``mid_data`` (after the first bytes of the first data
file), ``after_data_before_commit`` (every data file written, no ``.metadata`` yet),
``during_publish`` (manifest written, right before the publishing rename or marker),
``after_fence`` (the commit's lease check passed, the rename or marker not yet made),
``during_replace`` (replacing step-N: after the swap, before the old copy is removed; in the
two-rename fallback, between the two renames), ``during_purge`` (a purged step renamed to
trash, or its marker removed, not yet deleted), ``during_upload`` (an object store: after the
first part of the first data object), ``during_snapshot`` and ``during_replica`` (the memory
tier: a snapshot copied into its slot, not yet committed; a replica's transfer begun). Unset, each
point costs one dictionary lookup.

A leaf of the checkpoint package: it imports nothing of cairn.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time

FAULT_ENV = "CAIRN_FAULT"
FAULT_RANK_ENV = "CAIRN_FAULT_RANK"
FAULT_SKIP_ENV = "CAIRN_FAULT_SKIP"
FAULT_TIMES_ENV = "CAIRN_FAULT_TIMES"
FAULT_EXIT_CODE = 99
WRITER_PROCESS_ENV = "CAIRN_WRITER_PROCESS"  # set in an async save's writer process
FAULT_POINTS = ("before_data", "mid_data", "after_data_before_commit", "during_publish", "after_fence",
                "during_replace",
                "during_purge", "during_upload", "during_snapshot", "during_replica")
_passed: dict[str, int] = {}  # point -> times this process passed it (for CAIRN_FAULT_SKIP)
_acted: dict[str, int] = {}  # point -> times this process acted there (for CAIRN_FAULT_TIMES)


def armed(point: str) -> bool:
    """Whether ``CAIRN_FAULT`` names ``point`` (for callers that must prepare before reaching it)."""
    return os.environ.get(FAULT_ENV, "").partition(":")[0] == point


def fault_point(point: str, rank: int | None = None) -> None:
    """Crash here (or raise ENOSPC, or sleep) if ``CAIRN_FAULT`` names this point; see the module doc."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    name, _, action = spec.partition(":")
    if name != point:
        return
    only_rank = os.environ.get(FAULT_RANK_ENV)
    if only_rank is not None and rank is not None and int(only_rank) != rank:
        return
    skip = int(os.environ.get(FAULT_SKIP_ENV, "0") or 0)
    if skip:
        _passed[point] = _passed.get(point, 0) + 1
        if _passed[point] <= skip:
            return
    times = os.environ.get(FAULT_TIMES_ENV)
    if times:
        _acted[point] = _acted.get(point, 0) + 1
        if _acted[point] > int(times):
            return
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (injected by {FAULT_ENV}={spec})")
    if action.startswith("sleep="):
        time.sleep(float(action.partition("=")[2]))
        return
    if action == "stop":  # stopped mid-save until someone sends SIGCONT (the lease's fencing tests)
        sys.stderr.write(f"cairn: {FAULT_ENV}={spec}: pid {os.getpid()} stops at {point}\n")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    if action == "exit":  # this process alone ends (the writer process dying under a live trainer)
        sys.stderr.write(f"cairn: {FAULT_ENV}={spec}: pid {os.getpid()} exits at {point}\n")
        sys.stderr.flush()
        os._exit(FAULT_EXIT_CODE)
    sys.stderr.write(f"cairn: {FAULT_ENV}={spec}: killing pid {os.getpid()} at {point}\n")
    sys.stderr.flush()
    if os.environ.get(WRITER_PROCESS_ENV):  # in the writer process: the training process dies too
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
