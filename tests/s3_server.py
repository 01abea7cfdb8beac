"""A real S3-compatible server on 127.0.0.1 for the tests: moto's server mode, in a process of its own.

    python tests/s3_server.py [--port P] [--lifetime S]

prints ``http://127.0.0.1:<port>`` on its first line once it answers, then serves until its
standard input closes (the process that started it went away), it is killed, or ``--lifetime``
seconds have passed (default one hour): it always stops by itself. ``.ci/run`` starts one for
the whole suite and exports ``CAIRN_TEST_S3_ENDPOINT``; without that variable the tests start
their own (``tests/conftest.py``).

``FaultProxy`` sits between a client and the server to inject what a real store does under
load: ``503 SlowDown`` answers, and a window in which every connection is dropped (as while a
server restarts); with ``strip_conditions`` it is a store that ignores conditional writes
(older MinIO and RGW releases, some gateways): it drops ``If-None-Match`` and ``If-Match``
from every request before the server sees it. Its request loop runs on threads of the test
process and stops with it.
"""

from __future__ import annotations

import argparse
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "cairn-test", "AWS_SECRET_ACCESS_KEY": "cairn-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stdin_watcher(closed: threading.Event) -> None:
    """Set ``closed`` once standard input closes: the process that started this one went away."""

    def watch() -> None:
        try:
            while sys.stdin.read(1):
                pass
        except (OSError, ValueError):
            pass
        closed.set()

    threading.Thread(target=watch, daemon=True).start()


def atomic_conditional_writes() -> None:
    """Make moto's conditional PUT and DELETE atomic, as S3's are: moto checks ``If-Match`` /
    ``If-None-Match`` and then writes, on threads of its own, so two racing requests could both
    pass the check (the lease's race tests run many at once). One lock around each whole request."""
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    for name in ("put_object", "delete_object"):
        original = getattr(S3Response, name)

        def locked(self, _original=original):
            with lock:
                return _original(self)

        setattr(S3Response, name, locked)


def serve(port: int, lifetime: float, watch_stdin: bool = True) -> None:
    from moto.server import ThreadedMotoServer

    atomic_conditional_writes()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    deadline = time.monotonic() + lifetime
    print(f"http://127.0.0.1:{port}", flush=True)
    closed = threading.Event()
    if watch_stdin:
        stdin_watcher(closed)
    while not closed.is_set() and time.monotonic() < deadline:
        closed.wait(1.0)
    server.stop()


def start(lifetime: float = 3600.0) -> tuple[subprocess.Popen, str]:
    """Start a server process; returns (process, endpoint URL) once it answers."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, __file__, "--port", str(port), "--lifetime", str(lifetime)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                               text=True)
    line = process.stdout.readline().strip()
    if not line.startswith("http://"):
        process.kill()
        raise RuntimeError(f"the S3 test server did not start (said {line!r})")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return process, line
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the S3 test server does not answer")


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 to ``upstream`` that can answer 503 SlowDown or drop connections."""

    def __init__(self, upstream: str, strip_conditions: bool = False):
        self.upstream = urlsplit(upstream)
        self.strip_conditions = strip_conditions
        self.slowdowns = 0  # answer this many next requests with 503 SlowDown
        self.slowdown_methods = {"PUT", "GET", "POST", "HEAD", "DELETE"}
        self.down_until = 0.0  # drop every connection until this time.monotonic()
        self.requests = 0
        self.injected = 0
        self.dropped = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.requests += 1
                    drop = time.monotonic() < proxy.down_until
                    slow = not drop and proxy.slowdowns > 0 and self.command in proxy.slowdown_methods
                    if slow:
                        proxy.slowdowns -= 1
                        proxy.injected += 1
                    if drop:
                        proxy.dropped += 1
                if drop:
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if slow:
                    payload = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                               b"<Message>Please reduce your request rate.</Message></Error>")
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":  # a HEAD answer has no body
                        self.wfile.write(payload)
                    return
                connection = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                dropped = ("connection", "if-none-match", "if-match") if proxy.strip_conditions else ("connection",)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in dropped}
                connection.request(self.command, self.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                # a HEAD answer carries the object's length, not that of its (empty) body
                length = response.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                connection.close()

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except (ConnectionError, OSError):  # the client went away (or the outage dropped it)
                    self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class NotS3Server:
    """An HTTP server on 127.0.0.1 that is not S3 (every request: 404 and an HTML page), as found when
    AWS_ENDPOINT_URL names the wrong port. Threads of the test process serve it."""

    def __init__(self):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _handle(self) -> None:
                self.send_error(404)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def closed_port_url() -> str:
    """An endpoint where nothing listens (a store that is down)."""
    return f"http://127.0.0.1:{free_port()}"


_started: tuple[subprocess.Popen, str] | None = None


def endpoint() -> str:
    """The server the tests use: ``$CAIRN_TEST_S3_ENDPOINT`` (``.ci/run`` starts one), else one started
    for this process on first use, killed when the process exits."""
    global _started
    url = os.environ.get("CAIRN_TEST_S3_ENDPOINT")
    if url:
        return url
    if _started is None:
        import atexit

        _started = start()
        atexit.register(_started[0].kill)
    return _started[1]


def client(url: str):
    import boto3

    return boto3.client("s3", endpoint_url=url, aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")


def new_bucket(url: str) -> str:
    import uuid

    name = f"cairn-test-{uuid.uuid4().hex[:12]}"
    client(url).create_bucket(Bucket=name)
    return name


def environment(url: str) -> dict[str, str]:
    """What a process needs to talk to the test server the way AWS tools are configured."""
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": url}


try:
    import pytest

    @pytest.fixture
    def s3(monkeypatch):
        """A fresh bucket on the test server, and the environment pointing boto3 at it."""
        from types import SimpleNamespace

        url = endpoint()
        for key, value in environment(url).items():
            monkeypatch.setenv(key, value)
        bucket = new_bucket(url)
        return SimpleNamespace(url=url, bucket=bucket, uri=f"s3://{bucket}/run", client=client(url),
                               env=environment(url))
except ImportError:  # the server's own process (.ci/run) needs no pytest
    pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lifetime", type=float, default=3600.0, help="stop after this many seconds regardless")
    parser.add_argument("--no-watch-stdin", action="store_true",
                        help="serve until killed or --lifetime, whatever standard input does (.ci/run)")
    args = parser.parse_args()
    serve(args.port or free_port(), args.lifetime, watch_stdin=not args.no_watch_stdin)
