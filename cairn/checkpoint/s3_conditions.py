"""Conditional writes on an S3-compatible store: found out by trying, never assumed.

The commit marker and the lease are safe only if the store honours conditional requests:
``If-None-Match: *`` on a PUT (create if absent: two saves never both commit a step, two runs
never both take a folder) and ``If-Match: <ETag>`` on a PUT (replace if unchanged: the
lease's heartbeat and take-over, replacing a committed step). Stores differ: AWS S3 and moto
take the ETag as S3 returns it, with its quotes; Ceph RGW 16 refuses that form (412) and
takes it unquoted; older MinIO and RGW releases and some gateways ignore the headers and
overwrite. ``probe`` finds out with a handful of small requests on one object of its own
(removed before it returns): create-if-absent, replace-if-match (quoted, then unquoted) and
delete-if-match. What it finds is kept per endpoint and bucket for the process.

A store that lacks create- or replace-if-match is refused with one line naming what it
lacks, unless the user opted into running unprotected; then ``ConditionalWrites`` emulates
the missing condition by reading first (a race of two writers is then possible: that is what
the opt-in says). A store without delete-if-match is used as it is: the lease's release reads
and compares before it deletes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import uuid

from cairn.checkpoint.errors import CheckpointError
from cairn.checkpoint.s3_client import (
    CONDITION_FAILED,
    NOT_FOUND,
    S3Error,
    client,
    delete_key,
    endpoint,
    get_small,
    head,
    put_bytes,
    request,
    s3_uri,
)

logger = logging.getLogger("cairn")

PROBE_PREFIX = ".cairn-probe-"
_WRONG_ETAG = '"00000000000000000000000000000000"'
# Answers of a store that does not implement a conditional header at all (rather than refusing the write).
_UNSUPPORTED = ("NotImplemented", "501", "InvalidArgument", "InvalidRequest")


class UnprotectedStoreError(CheckpointError):
    """The store does not honour the conditional writes cairn's commits and lease rely on."""


@dataclasses.dataclass(frozen=True)
class Conditions:
    """What a store does with conditional writes (see the module doc)."""

    create: bool  # If-None-Match: * on PUT refuses an existing object
    match_form: str | None  # "quoted" / "unquoted": the ETag form If-Match on PUT takes; None: not honoured
    delete: bool  # If-Match on DELETE refuses another version

    def lacks(self) -> list[str]:
        """What a protected run needs and the store does not do, in a user's words."""
        out = []
        if not self.create:
            out.append("create-if-absent (If-None-Match: * on PUT)")
        if self.match_form is None:
            out.append("replace-if-match (If-Match on PUT)")
        return out

    def if_match(self, etag: str) -> str:
        """``etag`` in the form this store's If-Match takes."""
        bare = etag.strip('"')
        return bare if self.match_form == "unquoted" else f'"{bare}"'

_known: dict[tuple[str, str], Conditions] = {}
_lock = threading.Lock()


def conditions_of(bucket: str, prefix: str) -> Conditions:
    """What the store does with conditional writes: probed once per endpoint and bucket (per process)."""
    key = (endpoint(), bucket)
    with _lock:
        found = _known.get(key)
    if found is None:
        found = probe(bucket, prefix)
        with _lock:
            _known[key] = found
        logger.info("s3://%s at %s: conditional writes: create-if-absent %s, replace-if-match %s, delete-if-match %s",
                    bucket, key[0], "yes" if found.create else "NO", found.match_form or "NO",
                    "yes" if found.delete else "no")
    return found


def _accepted(action) -> bool | None:
    """Run one conditional request: True accepted, False refused by its condition, None the store
    does not implement the header (any other failure is raised)."""
    try:
        action()
        return True
    except S3Error as e:
        if e.code in CONDITION_FAILED or e.code in NOT_FOUND:
            return False
        if e.code in _UNSUPPORTED:
            return None
        raise


def probe(bucket: str, prefix: str) -> Conditions:
    """Try each conditional write on an object of its own under ``prefix``, then remove it."""
    key = f"{prefix}/{PROBE_PREFIX}{uuid.uuid4().hex}" if prefix else f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    folder = s3_uri(bucket, prefix)
    try:
        found = _try_conditions(bucket, key, folder)
    except BaseException:
        with contextlib.suppress(Exception):  # one try, not retried: the probe's own failure is the one to report
            client().delete_object(Bucket=bucket, Key=key)
        raise
    request("probing conditional writes in", folder, lambda: client().delete_object(Bucket=bucket, Key=key))
    return found


def _try_conditions(bucket: str, key: str, folder: str) -> Conditions:
    etag = ""

    def put(**condition: str) -> None:
        nonlocal etag
        etag = request("probing conditional writes in", folder, lambda: client().put_object(
            Bucket=bucket, Key=key, Body=uuid.uuid4().bytes, **condition))["ETag"]

    def delete(**condition: str) -> None:
        request("probing conditional writes in", folder, lambda: client().delete_object(
            Bucket=bucket, Key=key, **condition))

    created = _accepted(lambda: put(IfNoneMatch="*"))
    if not created:
        put()  # a store that refuses or ignores the header: the object the rest needs
    create = bool(created) and _accepted(lambda: put(IfNoneMatch="*")) is False
    match_form = None
    if _accepted(lambda: put(IfMatch=_WRONG_ETAG)) is False:  # a wrong version is refused...
        for form in ("quoted", "unquoted"):  # ...and the right one taken, in one of its forms
            current = Conditions(create, form, False).if_match(etag)
            if _accepted(lambda: put(IfMatch=current)):
                match_form = form
                break
    delete_refused = _accepted(lambda: delete(IfMatch=_WRONG_ETAG)) is False
    return Conditions(create, match_form, delete_refused and get_small(bucket, key) is not None)


def refusal(url: str, lacks: list[str], opt_in: str) -> UnprotectedStoreError:
    """The one line that refuses a store without the conditional writes cairn needs."""
    return UnprotectedStoreError(
        f"{url}: the store does not honour {' or '.join(lacks)}, so nothing would stop two runs from sharing "
        f"this folder or one save from overwriting another's commit; use a store that honours them, or accept "
        f"that risk with {opt_in}")


class ConditionalWrites:
    """Conditional puts and deletes of one store, in the form it takes: ``None`` when a condition
    failed. Where the store lacks a condition and the user accepted that (``unprotected``), the
    condition is checked by a read first, which a concurrent writer can race."""

    def __init__(self, bucket: str, conditions: Conditions, unprotected: bool):
        self.bucket, self.conditions, self.unprotected = bucket, conditions, unprotected

    def create(self, key: str, data: bytes, action: str = "writing", metadata: dict[str, str] | None = None) \
            -> str | None:
        """Put ``key`` (with user ``metadata``) only if it does not exist; its ETag, or None."""
        if not self.conditions.create:
            if head(self.bucket, key) is not None:
                return None
            return put_bytes(self.bucket, key, data, action, metadata)
        return self._put(key, data, action, metadata, IfNoneMatch="*")

    def replace(self, key: str, data: bytes, etag: str, action: str = "writing",
                metadata: dict[str, str] | None = None) -> str | None:
        """Put ``key`` only if its version is still ``etag`` (as the store returned it); its new ETag, or None."""
        if self.conditions.match_form is None:
            found = head(self.bucket, key)
            if found is None or found["ETag"].strip('"') != etag.strip('"'):
                return None
            return put_bytes(self.bucket, key, data, action, metadata)
        return self._put(key, data, action, metadata, IfMatch=self.conditions.if_match(etag))

    def delete(self, key: str, etag: str) -> bool:
        """Delete ``key`` only if its version is still ``etag``; whether it was (or was already gone)."""
        if not self.conditions.delete:  # read and compare: the release of a lease held until now
            found = head(self.bucket, key)
            if found is not None and found["ETag"].strip('"') != etag.strip('"'):
                return False
            delete_key(self.bucket, key)
            return True
        try:
            delete_key(self.bucket, key, IfMatch=self.conditions.if_match(etag))
            return True
        except S3Error as e:
            if e.code in CONDITION_FAILED:
                return False
            raise

    def _put(self, key: str, data: bytes, action: str, metadata: dict[str, str] | None, **condition: str) \
            -> str | None:
        try:
            return put_bytes(self.bucket, key, data, action, metadata, **condition)
        except S3Error as e:
            if e.code in CONDITION_FAILED or (e.code in NOT_FOUND and "IfMatch" in condition):
                return None
            raise
