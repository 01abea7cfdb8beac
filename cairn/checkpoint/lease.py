"""One run per checkpoint folder: a lease taken before anything in the folder is touched.

A job launched twice, or a requeued job whose old copy still runs, would otherwise share a
folder: the second run's start-up cleanup deletes the first run's save in flight, and both
write steps over each other. The lease is a small record in the folder (``.cairn-lease.json``)
naming its holder (host, pid, SLURM job, torchrun run and restart, start time) with a
heartbeat that a thread of the holder renews every 10 s (``CAIRN_LEASE_HEARTBEAT``). A second run
refuses at start with one message naming the holder. It takes the lease over only when the
holder is gone:

- on the same host, its process no longer exists, or is a zombie (killed, not yet reaped by its
  parent: it runs nothing and holds nothing);
- it belongs to the same torchrun run at an earlier restart (torchrun restarts all workers);
- its heartbeat is older than the lease timeout (``CAIRN_LEASE_TIMEOUT``, default 60 s): a
  holder on another node that died (clocks of a cluster's nodes are assumed synchronized).

The store provides four primitives (``lease_read``, ``lease_create``, ``lease_replace``,
``lease_delete``): on a POSIX folder, exclusive create and rename (works on shared
filesystems across nodes); on an object store, conditional puts (``If-None-Match``,
``If-Match``, in the form the store takes: see ``s3_conditions``). Only rank 0 holds the
lease, for the whole job.

A refused renewal is not taken for a lost lease until the record itself says so: the
heartbeat reads it back and compares the token (a store may refuse the version's form, or a
record may have been removed by hand); only another run's token means the folder was taken.
``confirm`` is the fence of the commit path: the store calls it right before a commit
publishes (``set_fence``), so a run that lost its folder, even while it waited for an earlier
save, commits nothing there.
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
            "token": uuid.uuid4().hex}


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return not _zombie(pid)  # someone else's process
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits to be reaped (state Z in /proc/<pid>/stat; Linux)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False  # no /proc here (or it is gone): kill(pid, 0) decided
    # "<pid> (<command, may hold spaces and parentheses>) <state> ...": the state follows the last ')'
    return stat[stat.rfind(b")") + 2:stat.rfind(b")") + 3] == b"Z"


def lease_state(store, timeout: float | None = None, now: float | None = None) -> dict[str, Any] | None:
    """The folder's lease as a reader sees it (``cairn checkpoint ls``): None when none is held,
    else ``holder`` (its record), ``text`` (who), ``heartbeat_age_s``, ``live`` and ``stale_reason``."""
    found = store.lease_read()
    if found is None:
        return None
    holder = found[0]
    now = time.time() if now is None else now
    reason = stale_reason(holder, {**_me(), "run_id": None}, lease_timeout() if timeout is None else timeout, now)
    beat = holder.get("heartbeat")
    return {"holder": holder, "text": describe(holder, now), "live": reason is None, "stale_reason": reason,
            "heartbeat_age_s": round(now - beat, 1) if isinstance(beat, (int, float)) else None}


def describe(holder: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    parts = [f"host {holder.get('host')}", f"pid {holder.get('pid')}"]
    if holder.get("job_id"):
        parts.append(f"SLURM job {holder['job_id']}")
    if holder.get("run_id") and holder.get("run_id") != "none":
        parts.append(f"torchrun run {holder['run_id']}")
    parts.append(f"started {holder.get('started')}")
    beat = holder.get("heartbeat")
    if isinstance(beat, (int, float)):
        parts.append(f"last heartbeat {max(0.0, now - beat):.0f} s ago")
    return ", ".join(parts)


def stale_reason(holder: dict[str, Any], me: dict[str, Any], timeout: float, now: float | None = None) -> str | None:
    """Why ``holder``'s lease no longer holds (None: its holder may be alive)."""
    now = time.time() if now is None else now
    if holder.get("host") == me["host"] and not _pid_alive(holder.get("pid")):
        return f"its process {holder.get('pid')} on this host is gone"
    if (me.get("run_id") not in (None, "none") and holder.get("run_id") == me["run_id"]
            and isinstance(holder.get("restart"), int) and holder["restart"] < me["restart"]):
        return f"torchrun restarted run {me['run_id']} (restart {holder['restart']} -> {me['restart']})"
    beat = holder.get("heartbeat")
    if not isinstance(beat, (int, float)):
        return "it has no heartbeat"
    if now - beat > timeout:
        return f"its last heartbeat is {now - beat:.0f} s old (timeout {timeout:.0f} s)"
    return None


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
            record = {**me, "heartbeat": time.time()}
            version = store.lease_create(record)
            if version is not None:
                return cls(store, record, version)
            current = store.lease_read()
            if current is None:
                continue  # released meanwhile: try again
            holder, held_version = current
            reason = stale_reason(holder, me, timeout)
            if reason is None:
                raise FolderBusyError(
                    f"checkpoint folder {store.url} is in use by another run ({describe(holder)}); two runs on one "
                    f"folder would delete each other's saves. Stop that run, or use another folder (Config.folder). "
                    f"If it is gone, its lease expires {timeout:.0f} s after its last heartbeat ({TIMEOUT_ENV})")
            record = {**me, "heartbeat": time.time()}
            version = store.lease_replace(record, held_version)
            if version is not None:
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
            if current is not None and current[0].get("token") == self.token:
                version = self.store.lease_replace(record, current[1])
            elif current is None:
                version = self.store.lease_create(record)
                current = self.store.lease_read() if version is None else None
            if version is None:
                holder = describe(current[0]) if current else "another run"
                return f"the lease of checkpoint folder {self.store.url} was taken by {holder}"
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

    def confirm(self) -> None:
        """The commit fence: renew the lease now (one conditional write, so the answer is the
        store's, not a cached flag's) and raise LeaseLostError if this run no longer holds it."""
        with self._lock:
            if self.lost is None:
                self.lost = self._renew()
        if self.lost is not None:
            raise LeaseLostError(f"{self.lost}; this save was not committed there")

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.lost is None:
            try:
                self.store.lease_delete(self.version)
            except Exception as e:  # noqa: BLE001 - it expires by itself
                logger.warning("could not release the lease of %s (%s); it expires by itself", self.store.url, e)
