"""A second, real S3 implementation for the tests: Ceph's RADOS Gateway on a throwaway cluster on 127.0.0.1.

    python3 tests/rgw_server.py [--lifetime S] [--no-watch-stdin] [--memstore-gb G]

starts one monitor, one OSD keeping its objects in memory (memstore) and one radosgw, all
on 127.0.0.1 in a temporary directory, makes the test user (the same credentials as
``tests/s3_server.py``), and prints ``http://127.0.0.1:<port>`` on its first line once the
gateway answers S3 requests; its second line is the seconds that took. It then serves until
its standard input closes, it is killed, or ``--lifetime`` seconds have passed (default one
hour), and removes the cluster: the daemons die with it (``PR_SET_PDEATHSIG``), whatever
ends it. Needs Debian's ``radosgw``, ``ceph-mon`` and ``ceph-osd`` packages (``.ci/run``
installs them); uses only the standard library, so the system's python3 runs it.

``.ci/run`` starts one for the whole suite and exports ``CAIRN_TEST_RGW_ENDPOINT`` (and
``CAIRN_TEST_RGW_REQUIRED``); the RGW tests skip without the endpoint (``rgw`` fixture below),
except where it is required: in CI the second implementation must be there.

Why RGW: it is the S3 server many clusters run, and it differs from moto where cairn must
not assume: its If-Match takes an ETag without the quotes S3 returns it with (16.2), and it
ignores If-Match on DELETE.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

from s3_server import CREDENTIALS, environment, free_port, stdin_watcher  # the same test user

DAEMONS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph-authtool", "ceph")
START_TIMEOUT_S = 120


def missing_tools() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None]


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _option(line: str) -> str:
    """The option a ceph.conf line sets, as Ceph reads it (``rgw gc obj min wait`` is ``rgw_gc_obj_min_wait``)."""
    return line.partition("=")[0].strip().replace(" ", "_").lower()


def _config(root: Path, fsid: str, mon_port: int, rgw_port: int, memstore_bytes: int, beast: str,
            settings: list[str]) -> str:
    text = _default_config(root, fsid, mon_port, rgw_port, memstore_bytes, beast)
    overridden = {_option(line) for line in settings}
    head, _, rest = text.partition("[mon.a]")
    kept = [line for line in head.splitlines() if _option(line) not in overridden]
    return "\n".join(kept + list(settings)) + "\n[mon.a]" + rest


def _default_config(root: Path, fsid: str, mon_port: int, rgw_port: int, memstore_bytes: int, beast: str) -> str:
    return f"""[global]
fsid = {fsid}
mon host = v1:127.0.0.1:{mon_port}
keyring = {root}/keyring
run dir = {root}/run
admin socket = {root}/run/$name.asok
pid file = {root}/run/$name.pid
log file = {root}/log/$name.log
ms bind msgr2 = false
ms bind ipv6 = false
auth allow insecure global id reclaim = false
mon warn on insecure global id reclaim allowed = false
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = {memstore_bytes}
osd max object name len = 460
osd max object namespace len = 64
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}{" " + beast if beast else ""}
rgw data = {root}/rgw
rgw enable usage log = false
rgw enable ops log = false
rgw gc obj min wait = 10
rgw gc processor period = 15
[mon.a]
mon data = {root}/mon.a
[osd.0]
osd data = {root}/osd.0
keyring = {root}/osd.0/keyring
"""


class Cluster:
    """One monitor, one memstore OSD and one radosgw under ``root``; ``stop`` ends them."""

    def __init__(self, root: Path, memstore_bytes: int, beast: str = "", settings: list[str] = ()):
        self.root = root
        self.conf = root / "ceph.conf"
        self.mon_port, self.rgw_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.rgw_port}"
        self.daemons: list[subprocess.Popen] = []
        for name in ("run", "log", "osd.0", "rgw"):
            (root / name).mkdir(parents=True)
        self.fsid = str(uuid.uuid4())
        self.conf.write_text(_config(root, self.fsid, self.mon_port, self.rgw_port, memstore_bytes, beast,
                                     list(settings)))

    def _run(self, *args: str, stdin: str | None = None, timeout: float = 60) -> str:
        done = subprocess.run(list(args), cwd=self.root, input=stdin, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
        return done.stdout

    def _daemon(self, *args: str) -> None:
        log = open(self.root / "log" / f"{Path(args[0]).name}.out", "w")
        self.daemons.append(subprocess.Popen(list(args), cwd=self.root, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent))

    def start(self) -> None:
        conf = str(self.conf)
        self._run("monmaptool", "--create", "--add", "a", f"v1:127.0.0.1:{self.mon_port}", "--fsid", self.fsid,
                  str(self.root / "monmap"))
        self._run("ceph-authtool", "--create-keyring", str(self.root / "keyring"), "--gen-key", "-n", "mon.",
                  "--cap", "mon", "allow *")
        self._run("ceph-authtool", str(self.root / "keyring"), "--gen-key", "-n", "client.admin", "--cap", "mon",
                  "allow *", "--cap", "osd", "allow *", "--cap", "mgr", "allow *")
        self._run("ceph-mon", "-c", conf, "--mkfs", "-i", "a", "--monmap", str(self.root / "monmap"),
                  "--keyring", str(self.root / "keyring"))
        self._daemon("ceph-mon", "-f", "-c", conf, "-i", "a")
        osd_uuid, key = str(uuid.uuid4()), self._run("ceph-authtool", "--gen-print-key").strip()
        osd_id = self._run("ceph", "-c", conf, "--connect-timeout", "30", "osd", "new", osd_uuid, "-i", "-",
                           stdin=json.dumps({"cephx_secret": key})).strip()
        (self.root / "osd.0" / "keyring").write_text(f"[osd.{osd_id}]\n\tkey = {key}\n")
        self._run("ceph-osd", "-c", conf, "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
        self._daemon("ceph-osd", "-f", "-c", conf, "-i", osd_id)
        self._daemon("radosgw", "-f", "-c", conf, "-n", "client.admin")
        # Creates the gateway's pools if radosgw has not yet (both wait for the OSD).
        self._run("radosgw-admin", "-c", conf, "user", "create", "--uid", "cairn-test", "--display-name", "cairn",
                  "--access-key", CREDENTIALS["AWS_ACCESS_KEY_ID"], "--secret-key",
                  CREDENTIALS["AWS_SECRET_ACCESS_KEY"], timeout=START_TIMEOUT_S)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            dead = [p for p in self.daemons if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0].args[0]} exited with code {dead[0].returncode} (see {self.root}/log)")
            try:
                with urllib.request.urlopen(self.url + "/", timeout=5) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"radosgw does not answer at {self.url} after {START_TIMEOUT_S} s")
            time.sleep(0.2)

    def stop(self) -> None:
        for process in reversed(self.daemons):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.daemons):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def serve(lifetime: float, watch_stdin: bool, memstore_gb: float, keep: bool, beast: str = "",
          settings: list[str] = ()) -> int:
    missing = missing_tools()
    if missing:
        print(f"rgw_server: missing {', '.join(missing)} (apt-get install radosgw ceph-mon ceph-osd)", file=sys.stderr)
        return 1
    root = Path(tempfile.mkdtemp(prefix="cairn-rgw-"))
    cluster = Cluster(root, int(memstore_gb * (1 << 30)), beast, settings)
    started = time.monotonic()
    try:
        try:
            cluster.start()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
            print(f"rgw_server: {e}", file=sys.stderr)
            for log in sorted((root / "log").glob("*")):
                print(f"--- {log.name}:\n{log.read_text(errors='replace')[-2000:]}", file=sys.stderr)
            return 1
        print(cluster.url, flush=True)
        print(f"{time.monotonic() - started:.1f} s to start", flush=True)
        closed = threading.Event()
        if watch_stdin:
            stdin_watcher(closed)
        signal.signal(signal.SIGTERM, lambda *_: closed.set())
        deadline = time.monotonic() + lifetime
        while not closed.is_set() and time.monotonic() < deadline:
            if any(p.poll() is not None for p in cluster.daemons):
                print("rgw_server: a daemon exited; stopping", file=sys.stderr)
                return 1
            closed.wait(1.0)
        return 0
    finally:
        cluster.stop()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


try:
    import pytest

    @pytest.fixture
    def rgw(monkeypatch):
        """A fresh bucket on the RGW of ``CAIRN_TEST_RGW_ENDPOINT``, and the environment pointing boto3 at it."""
        from types import SimpleNamespace

        import boto3

        url = os.environ.get("CAIRN_TEST_RGW_ENDPOINT")
        if not url:
            if os.environ.get("CAIRN_TEST_RGW_REQUIRED"):
                pytest.fail("CAIRN_TEST_RGW_ENDPOINT is not set: .ci/run starts Ceph RGW for these tests")
            pytest.skip("no Ceph RGW (CAIRN_TEST_RGW_ENDPOINT; python3 tests/rgw_server.py starts one)")
        for key, value in environment(url).items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
        bucket = f"cairn-test-{uuid.uuid4().hex[:12]}"
        s3.create_bucket(Bucket=bucket)
        return SimpleNamespace(url=url, bucket=bucket, uri=f"s3://{bucket}/run", client=s3, env=environment(url))
except ImportError:  # the launcher's own process needs no pytest
    pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lifetime", type=float, default=3600.0, help="stop after this many seconds regardless")
    parser.add_argument("--no-watch-stdin", action="store_true",
                        help="serve until killed or --lifetime, whatever standard input does (.ci/run)")
    parser.add_argument("--memstore-gb", type=float, default=4.0,
                        help="most bytes the OSD keeps in memory (objects deleted are freed by RGW's collector)")
    parser.add_argument("--keep", action="store_true", help="keep the cluster's directory (its logs) at the end")
    parser.add_argument("--beast", default="", help="more options of the beast frontend, e.g. tcp_nodelay=1 "
                                                    "(default: none, as Debian's RGW runs)")
    parser.add_argument("--set", action="append", default=[], metavar="'KEY = VALUE'",
                        help="one more line of ceph.conf's [global] (later lines win), e.g. 'rgw gc obj min wait = 7200'")
    args = parser.parse_args()
    sys.exit(serve(args.lifetime, not args.no_watch_stdin, args.memstore_gb, args.keep, args.beast, args.set))
