"""One run per checkpoint folder: a lease taken before anything in the folder is touched.

A job launched twice, or a requeued job whose old copy still runs, would otherwise share a
folder: the second run's start-up cleanup deletes the first run's save in flight, and both
write steps over each other. The lease is a small record in the folder naming its holder
(host, pid, SLURM job, torchrun run and restart, start time), renewed by a thread of the holder
every 10 s (``CAIRN_LEASE_HEARTBEAT``). A second run refuses at start with one message naming
the holder. It takes the lease over only when the holder is gone:

- on the same host, its process no longer exists, or is a zombie (killed, not yet reaped by its
  parent: it runs nothing and holds nothing);
- it belongs to the same torchrun run at an earlier restart (torchrun restarts all workers);
- its lease has not been renewed for the lease timeout (``CAIRN_LEASE_TIMEOUT``, default 60 s).

How long ago the lease was renewed is never read from the record (the holder's clock may run
a day ahead or behind this host's): it is the age of the lease as the storage itself stamps it
(``store.lease_age``: the file's mtime against that of a file written now, the object's
``LastModified`` against the server's ``Date``), and before a takeover this run watches the
lease for a heartbeat and a half (at most the timeout) to see that it does not change: a
filesystem that stamps files with its clients' clocks (a live holder's file looks old) is not
taken for a dead holder. A lease stamped in the storage's future is watched for the whole
timeout. So a dead holder whose clock ran ahead expires a timeout after its last renewal, and a
live one whose clock runs behind is never taken over.

A holder on this host that is alive but stopped or hung (SIGSTOP, a debugger, a stuck
filesystem) and has not renewed its lease for the timeout is taken over all the same (a
requeued job must be able to start; the log says its process is still alive): it is fenced.
Taking over is a compare-and-swap on the lease's version (``lease_replace``: exactly one of
any number of contenders that read a version replaces it; see the stores), so a takeover and
the old holder's renewal can never both succeed. ``confirm`` is the fence of the commit path:
the store calls it right before a commit publishes (``set_fence``) and it renews the lease by
the same compare-and-swap, so a run that lost its folder (stopped while another took over,
then continued) commits nothing there; its heartbeat finds out too, and its next save stops it
with one line. A release writes a record that says ``released`` (the next run replaces it), so
a holder that lost its lease never finds the folder free and takes it back.

A refused renewal is not taken for a lost lease until the record itself says so: the
heartbeat reads it back and compares the token (a store may refuse the version's form, or a
record may have been removed by hand); only another run's token means the folder was taken.
Only rank 0 holds the lease, for the whole job.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from cairn.checkpoint.errors import CheckpointError

logger = logging.getLogger("cairn")

TIMEOUT_ENV, HEARTBEAT_ENV = "CAIRN_LEASE_TIMEOUT", "CAIRN_LEASE_HEARTBEAT"
DEFAULT_TIMEOUT_S, DEFAULT_HEARTBEAT_S = 60.0, 10.0


class FolderBusyError(CheckpointError):
    """The checkpoint folder's lease is held by a run that is alive."""


class LeaseLostError(CheckpointError):
    """This run no longer holds its folder's lease: another run took it over."""


def _seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise CheckpointError(f"{name}={raw!r}: expected seconds > 0")
    return value


def lease_timeout() -> float:
    """How old a heartbeat may be before another run takes the lease over (``CAIRN_LEASE_TIMEOUT``)."""
    return _seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def heartbeat_interval() -> float:
    """How often the holder renews its lease (``CAIRN_LEASE_HEARTBEAT``, default 10 s)."""
    return _seconds(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S)


def _me() -> dict[str, Any]:
    env = os.environ
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": env.get("SLURM_JOB_ID"),
            "run_id": env.get("TORCHELASTIC_RUN_ID"), "restart": int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "heartbeat_s": heartbeat_interval(), "token": uuid.uuid4().hex}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return _state(pid) != "Z"  # someone else's process
    return _state(pid) != "Z"


def _state(pid: int) -> str | None:
    """The process's state letter in /proc/<pid>/stat (R, S, D, T, Z...; Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None  # no /proc here (or it is gone): kill(pid, 0) decided
    # "<pid> (<command, may hold spaces and parentheses>) <state> ...": the state follows the last ')'
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3].decode("ascii", "replace") or None


_STATES = {"T": "stopped (SIGSTOP?)", "t": "stopped by a debugger", "D": "hung in the kernel (on I/O?)"}


def lease_state(store, timeout: float | None = None) -> dict[str, Any] | None:
    """The folder's lease as a reader sees it (``cairn checkpoint ls``): None when none is held,
    else ``holder`` (its record), ``text`` (who), ``heartbeat_age_s`` (since it was last renewed,
    on the storage's clock), ``live`` and ``stale_reason``. Nothing is waited for: a lease the
    storage dates in its future counts as live here."""
    found = store.lease_read()
    if found is None or found[0].get("released"):
        return None
    holder, version = found
    try:
        age = store.lease_age(version)
    except CheckpointError:  # a folder this reader cannot write into: the age is not known
        age = None
    reason = stale_reason(holder, {**_me(), "run_id": None}, lease_timeout() if timeout is None else timeout, age)
    return {"holder": holder, "text": describe(holder, age), "live": reason is None, "stale_reason": reason,
            "heartbeat_age_s": round(age, 1) if age is not None else None}


def describe(holder: dict[str, Any], age: float | None = None) -> str:
    """Who holds a lease; ``age``: seconds since it was renewed (the storage's clock)."""
    parts = [f"host {holder.get('host')}", f"pid {holder.get('pid')}"]
    if holder.get("job_id"):
        parts.append(f"SLURM job {holder['job_id']}")
    if holder.get("run_id") and holder.get("run_id") != "none":
        parts.append(f"torchrun run {holder['run_id']}")
    parts.append(f"started {holder.get('started')}")
    if age is not None:
        parts.append(f"last renewed {max(0.0, age):.0f} s ago")
    return ", ".join(parts)


def stale_reason(holder: dict[str, Any], me: dict[str, Any], timeout: float, age: float | None = None) -> str | None:
    """Why ``holder``'s lease no longer holds (None: its holder may be alive). ``age``: seconds
    since the lease was last renewed on the storage's clock (None: not known)."""
    same_host = holder.get("host") == me["host"]
    if same_host and not _pid_alive(holder.get("pid")):
        return f"its process {holder.get('pid')} on this host is gone"
    if (me.get("run_id") not in (None, "none") and holder.get("run_id") == me["run_id"]
            and isinstance(holder.get("restart"), int) and holder["restart"] < me["restart"]):
        return f"torchrun restarted run {me['run_id']} (restart {holder['restart']} -> {me['restart']})"
    if age is not None and age > timeout:
        reason = f"it was last renewed {age:.0f} s ago (timeout {timeout:g} s, {TIMEOUT_ENV}; the storage's clock)"
        if same_host:
            state = _STATES.get(_state(holder["pid"]) or "", "alive but not renewing its lease")
            reason += (f"; its process {holder['pid']} on this host is still {state}: it is fenced, and commits "
                       "nothing more in this folder")
        return reason
    return None


CLOCK_SLACK_S = 2.0  # an age this far below zero is a lease dated in the storage's future


def _watch_seconds(holder: dict[str, Any], age: float, timeout: float) -> float:
    """How long to watch a lease that looks stale (or is dated in the future) for a renewal."""
    if age < -CLOCK_SLACK_S:
        return timeout  # when it was last renewed is unknown: a whole timeout without a change
    interval = holder.get("heartbeat_s")
    if not isinstance(interval, (int, float)) or interval <= 0:
        interval = DEFAULT_HEARTBEAT_S
    return min(timeout, 1.5 * interval)


def _unchanged_for(store, version: str, seconds: float) -> bool:
    """Whether the lease stays at ``version`` for ``seconds`` (this host's monotonic clock)."""
    deadline = time.monotonic() + seconds
    while True:
        current = store.lease_read()
        if current is None or current[1] != version:
            return False
        left = deadline - time.monotonic()
        if left <= 0:
            return True
        time.sleep(min(left, max(0.05, seconds / 20)))


def _busy(store, holder: dict[str, Any], age: float | None, timeout: float) -> FolderBusyError:
    return FolderBusyError(
        f"checkpoint folder {store.url} is in use by another run ({describe(holder, age)}); two runs on one folder "
        f"would delete each other's saves. Stop that run, or use another folder (Config.folder). If it is gone, its "
        f"lease expires {timeout:g} s after it was last renewed ({TIMEOUT_ENV})")


class FolderLease:
    """The lease of one store's folder, held by this process until ``release``."""

    def __init__(self, store, record: dict[str, Any], version: str):
        self.store = store
        self.record = record
        self.version = version
        self.lost: str | None = None  # why the lease was lost, if it was
        self._lock = threading.Lock()  # the heartbeat and a commit's fence both read and renew
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="cairn-lease", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, store, timeout: float | None = None) -> FolderLease:
        """Take the lease of ``store``'s folder, or raise FolderBusyError naming its live holder."""
        timeout = lease_timeout() if timeout is None else timeout
        me = _me()
        for _ in range(5):
            current = store.lease_read()
            if current is None:
                record = {**me, "heartbeat": time.time()}
                version = store.lease_create(record)
                if version is not None:
                    return cls(store, record, version)
                continue  # another run took it first: read who
            holder, held_version = current
            reason = None if holder.get("released") else stale_reason(holder, me, timeout)
            if not holder.get("released") and reason is None:
                age = store.lease_age(held_version)
                if age is None:
                    again = store.lease_read()
                    if again is not None and again[1] == held_version:  # there, but its age is not known
                        raise _busy(store, holder, None, timeout)
                    continue  # renewed meanwhile: read it again
                reason = stale_reason(holder, me, timeout, age)
                if reason is None and age < -CLOCK_SLACK_S:
                    reason = (f"it is dated {-age:.0f} s in the storage's future (a clock ahead), and was not "
                              f"renewed in the {timeout:g} s ({TIMEOUT_ENV}) this run watched it")
                if reason is None:
                    raise _busy(store, holder, age, timeout)
                watch = _watch_seconds(holder, age, timeout)
                logger.info("the lease of checkpoint folder %s looks stale (%s); watching it %.1f s for a renewal",
                            store.url, describe(holder, age), watch)
                if not _unchanged_for(store, held_version, watch):  # renewed: alive (its clock, or its
                    current = store.lease_read()  # filesystem's stamps, may run behind), or just taken
                    if current is None or current[0].get("released"):
                        continue
                    raise _busy(store, current[0], store.lease_age(current[1]), timeout)
                if age >= -CLOCK_SLACK_S:
                    reason += f", and did not change in the {watch:.1f} s this run watched it"
            record = {**me, "heartbeat": time.time()}
            version = store.lease_replace(record, held_version)
            if version is not None:
                if reason is not None:
                    logger.warning("took over the lease of checkpoint folder %s from %s: %s", store.url,
                                   describe(holder), reason)
                return cls(store, record, version)
        raise FolderBusyError(f"could not take the lease of checkpoint folder {store.url}: five times another run "
                              "took or renewed it first; try again, or look at `cairn checkpoint ls "
                              f"{store.url}`")

    @property
    def token(self) -> str:
        return self.record["token"]

    def _renew(self) -> str | None:
        """Renew the heartbeat; None while held, else why it is lost. A refused renewal is
        checked against the record itself: this run's token (the store refused the version's
        form, or the record changed by this run's own earlier write) is still held; no record
        (removed by hand) is created again if nobody else did first; another token is lost."""
        record = {**self.record, "heartbeat": time.time()}
        version = self.store.lease_replace(record, self.version)
        if version is None:
            current = self.store.lease_read()
            if current is not None and current[0].get("token") == self.token and not current[0].get("released"):
                version = self.store.lease_replace(record, current[1])
            elif current is None:
                version = self.store.lease_create(record)
                current = self.store.lease_read() if version is None else None
            if version is None:
                holder = describe(current[0]) if current else "another run"
                verb = "taken, then released," if current and current[0].get("released") else "taken"
                return f"the lease of checkpoint folder {self.store.url} was {verb} by {holder}"
        self.record, self.version = record, version
        return None

    def _beat(self) -> None:
        interval = heartbeat_interval()
        while not self._stop.wait(interval):
            try:
                with self._lock:
                    if self.lost is not None:
                        return
                    lost = self._renew()
                    if lost is not None:
                        self.lost = lost
            except Exception as e:  # noqa: BLE001 - a storage hiccup: try again at the next beat
                logger.warning("could not renew the lease of %s (%s)", self.store.url, e)
                continue
            if lost is not None:
                logger.error("%s; this run will not save into it any more", lost)
                return

    def check(self) -> None:
        """Raise LeaseLostError if the lease was lost (another run took the folder over)."""
        if self.lost is not None:
            raise LeaseLostError(f"{self.lost}; nothing more is saved there by this run")

    def check_held(self) -> None:
        """Raise LeaseLostError unless the store's lease is still this run's (one read, no write)."""
        self.check()
        current = self.store.lease_read()  # None: removed by hand; the next heartbeat writes it again
        if current is not None and (current[0].get("token") != self.token or current[0].get("released")):
            with self._lock:
                self.lost = self.lost or f"the lease of checkpoint folder {self.store.url} was taken by " \
                                         f"{describe(current[0])}"
            self.check()

    def confirm(self) -> None:
        """The commit fence: renew the lease now (one conditional write, so the answer is the
        store's, not a cached flag's) and raise LeaseLostError if this run no longer holds it."""
        with self._lock:
            if self.lost is None:
                self.lost = self._renew()
        if self.lost is not None:
            raise LeaseLostError(f"{self.lost}; this save was not committed there")

    def release(self) -> None:
        """Give the folder back: the lease is replaced by a record that says it was released (by
        the same compare-and-swap), so the next run takes it at once and a run that lost it
        never takes it back."""
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            if self.lost is not None:
                return
            self.lost = "this run released it"
            try:
                self.store.lease_replace({**self.record, "released": True, "heartbeat": time.time()}, self.version)
            except Exception as e:  # noqa: BLE001 - it expires by itself
                logger.warning("could not release the lease of %s (%s); it expires by itself", self.store.url, e)
