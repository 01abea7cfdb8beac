"""Talking to an S3-compatible store: URIs, the client, bounded retries, one clear error per failure.

Every request of the object-store backend goes through ``request``: a failure that may pass
(a dropped or refused connection, a timeout, a body cut short, ``503 SlowDown`` and other
5xx answers) is retried with jittered backoff (0.25 s doubling to 4 s) for at most ``retry_seconds()``
(``CAIRN_S3_RETRY_S``, default 30 s) after the first failure; the request in flight when
that time is up may add its own timeouts (``CONNECT_TIMEOUT_S`` to connect,
``READ_TIMEOUT_S`` without a byte). Whatever fails in the end, or at once (credentials,
permissions, a missing bucket, a server that is not S3), is one ``S3Error``: one line naming
the URI, the action and the cause, never a traceback and never a credential. botocore's own
retries are off, so that bound is the only one.

Credentials and endpoint come the way every AWS tool takes them (the environment,
``~/.aws/credentials`` and ``config``, ``AWS_PROFILE``, ``AWS_ENDPOINT_URL`` /
``AWS_ENDPOINT_URL_S3`` for S3-compatible stores).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    IncompleteReadError,
    ReadTimeoutError,
    SSLError,
)
from botocore.exceptions import ConnectionError as ConnectError

from cairn.checkpoint.errors import CheckpointError

logger = logging.getLogger("cairn")

PART_ENV, CONNECTIONS_ENV, RETRY_ENV = "CAIRN_S3_PART_MB", "CAIRN_S3_CONNECTIONS", "CAIRN_S3_RETRY_S"
MIN_PART_BYTES = 5 << 20  # S3's smallest part (but the last)
DEFAULT_RETRY_S = 30.0
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 5, 60
FIRST_BACKOFF_S, MAX_BACKOFF_S = 0.25, 4.0

NOT_FOUND = ("404", "NoSuchKey", "NotFound")
CONDITION_FAILED = ("PreconditionFailed", "412", "ConditionalRequestConflict")
# Answers a store gives while it is busy or restarting: worth another try.
_PASSING_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
                  "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "TooManyRequests",
                  "500", "502", "503", "504"}

T = TypeVar("T")


def part_bytes() -> int:
    raw = os.environ.get(PART_ENV, "").strip()
    value = float(raw) if raw else 64.0
    if value * (1 << 20) < MIN_PART_BYTES:
        raise CheckpointError(f"{PART_ENV}={raw!r}: parts are at least 5 MiB")
    return int(value * (1 << 20))


def connections() -> int:
    raw = os.environ.get(CONNECTIONS_ENV, "").strip()
    value = int(raw) if raw else 16
    if value < 1:
        raise CheckpointError(f"{CONNECTIONS_ENV}={raw!r}: expected a number >= 1")
    return value


def retry_seconds() -> float:
    """How long a failing request is retried after its first failure (``CAIRN_S3_RETRY_S``)."""
    raw = os.environ.get(RETRY_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_RETRY_S
    except ValueError:
        value = -1.0
    if value < 0:
        raise CheckpointError(f"{RETRY_ENV}={raw!r}: expected seconds >= 0")
    return value


# --- URIs ------------------------------------------------------------------------------------------

# What a bucket name may hold anywhere (AWS's legacy names included): letters, digits, dots,
# hyphens, underscores; 3 to 255 characters.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9._-]{3,255}$")


def parse_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix without slashes at either end) of ``s3://bucket/prefix``."""
    if not uri.lower().startswith("s3://"):
        raise CheckpointError(f"{uri}: not an s3:// URI (expected s3://bucket/prefix)")
    bucket, _, prefix = uri[5:].partition("/")
    if not bucket:
        raise CheckpointError(f"{uri}: no bucket (expected s3://bucket/prefix)")
    if not _BUCKET_RE.match(bucket):
        raise CheckpointError(f"{uri}: {bucket!r} is not a bucket name (3-255 letters, digits, dots, hyphens; "
                              "expected s3://bucket/prefix)")
    if "//" in prefix.strip("/"):
        raise CheckpointError(f"{uri}: empty path segment ('//') in the prefix")
    return bucket, prefix.strip("/")


# --- the client --------------------------------------------------------------------------------------

_clients: dict[tuple, Any] = {}
_client_lock = threading.Lock()
_CLIENT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_REGION",
               "AWS_DEFAULT_REGION", "AWS_SHARED_CREDENTIALS_FILE", "AWS_CONFIG_FILE")


def client():
    """This process's boto3 S3 client (thread-safe; made again after a fork, or when the
    environment that configures it changes). botocore retries nothing: ``request`` does."""
    key = (os.getpid(), tuple(os.environ.get(name) for name in _CLIENT_ENV))
    with _client_lock:
        made = _clients.get(key)
        if made is None:
            config = Config(retries={"total_max_attempts": 1, "mode": "standard"},
                            max_pool_connections=max(32, 2 * connections()), connect_timeout=CONNECT_TIMEOUT_S,
                            read_timeout=READ_TIMEOUT_S, tcp_keepalive=True)
            session = boto3.session.Session()
            made = session.client("s3", config=config,
                                  region_name=session.region_name or os.environ.get("AWS_REGION") or "us-east-1")
            _clients.clear()
            _clients[key] = made
        return made


def endpoint() -> str:
    """The endpoint the client talks to, for messages (and a key for what a store can do)."""
    return client().meta.endpoint_url


_pools: dict[int, concurrent.futures.ThreadPoolExecutor] = {}


def transfer_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that move parts of objects (one pool per process)."""
    pid = os.getpid()
    with _client_lock:
        pool = _pools.get(pid)
        if pool is None:
            pool = concurrent.futures.ThreadPoolExecutor(max_workers=connections(), thread_name_prefix="cairn-s3")
            _pools.clear()
            _pools[pid] = pool
        return pool


# --- errors ---------------------------------------------------------------------------------------

class S3Error(CheckpointError):
    """A request to the store failed; the message is one line naming the URI and the cause.
    ``code`` is the store's error code (``NoSuchKey``, ``PreconditionFailed``, ...), or the
    HTTP status, or the name of the exception when no answer came."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code

    def __reduce__(self):  # DCP pickles rank failures to the coordinator
        return (type(self), (str(self), self.code))


def error_code(error: BaseException) -> str | None:
    if isinstance(error, S3Error):
        return error.code
    response = getattr(error, "response", None)
    return (response or {}).get("Error", {}).get("Code") if isinstance(response, dict) else None


def _status(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def passing(error: BaseException) -> bool:
    """Whether ``error`` may pass if the request is sent again (see the module doc)."""
    if isinstance(error, SSLError):
        return False  # a certificate will not change
    if isinstance(error, (ConnectError, HTTPClientError, IncompleteReadError, ConnectionError, TimeoutError)):
        return True
    return error_code(error) in _PASSING_CODES or _status(error) in (500, 502, 503, 504)


def _connection_problem(error: BaseException) -> str:
    cause = str(getattr(error, "kwargs", {}).get("error", "") or error)
    for text, said in (("Connection refused", "connection refused"), ("Name or service not known", "unknown host"),
                       ("No route to host", "no route to host"), ("Network is unreachable", "network unreachable"),
                       ("Connection reset", "connection reset")):
        if text in cause:
            return said
    return type(error).__name__


def explain(error: BaseException, uri: str, action: str, retried: tuple[int, float] | None = None) -> S3Error:
    """One S3Error for a failed request on ``uri``; never any credential. ``retried``: (attempts, seconds)."""
    if isinstance(error, S3Error):
        return error
    code = error_code(error)
    name = type(error).__name__
    where = endpoint_text()
    if code == "NoSuchBucket":
        why = "the bucket does not exist"
    elif code in ("AccessDenied", "AllAccessDisabled", "403"):
        why = "access denied: the credentials in use may not do this (check the bucket policy)"
    elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
        why = "the credentials were refused (wrong or expired access key; see AWS_ACCESS_KEY_ID / ~/.aws/credentials)"
    elif name == "NoCredentialsError":
        why = ("no AWS credentials found (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, or an "
               "instance role)")
    elif isinstance(error, EndpointConnectionError):
        why = f"cannot connect to {where}: {_connection_problem(error)}"
    elif isinstance(error, ConnectTimeoutError):
        why = f"connecting to {where} timed out ({CONNECT_TIMEOUT_S} s)"
    elif isinstance(error, ReadTimeoutError):
        why = f"{where} sent nothing for {READ_TIMEOUT_S} s"
    elif isinstance(error, (ConnectError, HTTPClientError, IncompleteReadError, ConnectionError)):
        why = f"the connection to {where} broke ({name})"
    elif code in _PASSING_CODES:
        why = f"the store kept refusing ({code})"
    elif code is not None and code.isdigit() and isinstance(error, ClientError) and \
            error.operation_name not in ("HeadObject", "HeadBucket"):
        # An S3 server names every error in XML; a bare status is some other server on that port.
        why = (f"{where} did not answer as an S3 server (HTTP {code}); is AWS_ENDPOINT_URL the store's "
               "endpoint?")
    elif isinstance(error, (ClientError, BotoCoreError)):
        message = str(error).splitlines()[0] if str(error) else name
        why = f"{code or name}: {message}"
    else:
        why = f"{name}: {str(error).splitlines()[0] if str(error) else name}"
    if retried is not None and retried[0] > 1:
        why += f" (gave up after {retried[0]} attempts in {retried[1]:.0f} s)"
    return S3Error(f"{action} {uri} failed: {why}", code or name)


def endpoint_text() -> str:
    try:
        return endpoint()
    except Exception:  # noqa: BLE001 - only for a message
        return "the S3 endpoint"


def request(action: str, uri: str, call: Callable[[], T], missing_ok: bool = False) -> T | None:
    """``call()`` (one or more requests to the store, a body read included), retried with
    backoff while it fails in a way that may pass, for at most ``retry_seconds()``; any other
    failure, or the last one, is raised as one ``S3Error`` naming ``action`` and ``uri``.
    ``missing_ok``: None when the object does not exist."""
    attempts, first_failure, delay = 0, None, FIRST_BACKOFF_S
    while True:
        attempts += 1
        try:
            return call()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes an S3Error
            if missing_ok and error_code(e) in NOT_FOUND:
                return None
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            left = first_failure + retry_seconds() - now
            if not passing(e) or left <= 0:
                raise explain(e, uri, action, (attempts, now - first_failure)) from None
            if attempts == 1:
                logger.warning("%s %s: %s; retrying for up to %.0f s", action, uri,
                               str(explain(e, uri, action)).rpartition(" failed: ")[2], retry_seconds())
            time.sleep(min(left, random.uniform(delay / 2, delay)))  # jittered: parallel requests spread out
            delay = min(delay * 2, MAX_BACKOFF_S)


# --- small objects and listings -------------------------------------------------------------------

def s3_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def get_range(bucket: str, key: str, start: int, length: int, into: memoryview | None = None) -> bytes | None:
    """Bytes ``start .. start + length`` of an object (into ``into`` when given)."""

    def fetch():
        response = client().get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{start + length - 1}")
        data = response["Body"].read()  # one read: faster than urllib3's readinto into the buffer here
        if len(data) != length:
            raise CheckpointError(f"{s3_uri(bucket, key)}: {len(data)} bytes where {length} were asked for at byte "
                                  f"{start} (the object is shorter than its record)")
        if into is not None:
            into[:length] = data
            return None
        return data

    if length == 0:
        return b"" if into is None else None
    return request("reading", s3_uri(bucket, key), fetch)


def get_small(bucket: str, key: str) -> tuple[bytes, str] | None:
    """(its first 64 KiB, its ETag) of a small object (a marker, the lease), or None if it does not exist."""

    def fetch():
        response = client().get_object(Bucket=bucket, Key=key)
        return response["Body"].read(1 << 16), response["ETag"]

    return request("reading", s3_uri(bucket, key), fetch, missing_ok=True)


def head(bucket: str, key: str) -> dict | None:
    """The object's HEAD answer (``ContentLength``, ``ETag``, ...), or None if it does not exist."""
    return request("reading", s3_uri(bucket, key), lambda: client().head_object(Bucket=bucket, Key=key),
                   missing_ok=True)


def exists(bucket: str, key: str) -> bool:
    return head(bucket, key) is not None


def get_object(bucket: str, key: str, limit: int | None = None) -> bytes | None:
    """The whole object (one request: a small object's cost is its round trip), or None if it does
    not exist; CheckpointError if larger than ``limit``, before its body is read."""

    def fetch():
        response = client().get_object(Bucket=bucket, Key=key)
        size = response["ContentLength"]
        if limit is not None and size > limit:
            response["Body"].close()
            raise CheckpointError(f"{s3_uri(bucket, key)}: {size} bytes, more than such an object can hold "
                                  f"({limit})")
        data = response["Body"].read()
        if len(data) != size:
            raise IncompleteReadError(actual_bytes=len(data), expected_bytes=size)
        return data

    return request("reading", s3_uri(bucket, key), fetch, missing_ok=True)


def put_bytes(bucket: str, key: str, data: bytes, action: str = "writing", metadata: dict[str, str] | None = None,
              **conditions: str) -> str:
    """Put one small object (with user ``metadata``, which a HEAD returns); returns its ETag.
    ``conditions``: IfNoneMatch / IfMatch."""
    extra = {"Metadata": metadata} if metadata else {}
    return request(action, s3_uri(bucket, key),
                   lambda: client().put_object(Bucket=bucket, Key=key, Body=data, **extra, **conditions)["ETag"])


def delete_key(bucket: str, key: str, **conditions: str) -> None:
    """Delete one object (``conditions``: IfMatch); a missing one is no error."""
    request("deleting", s3_uri(bucket, key), lambda: client().delete_object(Bucket=bucket, Key=key, **conditions),
            missing_ok=True)


def delete_keys(bucket: str, keys: list[str], uri: str) -> list[str]:
    """Delete objects (under ``uri``, for messages), 1000 per request; returns the keys the store
    refused to delete."""
    failed = []
    for start in range(0, len(keys), 1000):
        batch = keys[start:start + 1000]
        answer = request("deleting objects under", uri, lambda: client().delete_objects(
            Bucket=bucket, Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True}))
        failed += [error["Key"] for error in answer.get("Errors", [])]
    return failed


def list_pages(bucket: str, prefix: str, delimiter: str | None = None) -> Iterator[dict]:
    """Every page of ListObjectsV2 under ``prefix`` (its ``Contents`` and ``CommonPrefixes``)."""
    kwargs = {"Bucket": bucket, "Prefix": prefix, **({"Delimiter": delimiter} if delimiter else {})}
    while True:
        page = request("listing", s3_uri(bucket, prefix), lambda: client().list_objects_v2(**kwargs))
        yield page
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def list_uploads(bucket: str, prefix: str) -> list[dict]:
    """Multipart uploads begun under ``prefix`` and never completed nor aborted (``Key``, ``UploadId``, ``Initiated``)."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
    uploads = []
    while True:
        page = request("listing the unfinished uploads of", s3_uri(bucket, prefix),
                       lambda: client().list_multipart_uploads(**kwargs))
        uploads += page.get("Uploads", [])
        if not page.get("IsTruncated"):
            return uploads
        kwargs.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))


def abort_upload(bucket: str, key: str, upload_id: str) -> None:
    try:
        request("aborting the upload of", s3_uri(bucket, key),
                lambda: client().abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id))
    except S3Error as e:
        if e.code not in ("NoSuchUpload", *NOT_FOUND):
            raise
