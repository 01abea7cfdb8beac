"""The storage seam: what the manager, the save/load functions and the CLI need from a place
that holds checkpoints, and ``open_store`` to get one for a path or URI.

A store holds committed steps. Every implementation keeps the same promises (docs/design.md):
a step is visible only once every rank's files and its manifest are complete; a crash at any
moment leaves the committed steps readable; a delete makes a step invisible before it removes
its files; reading never runs code from the checkpoint and checks what it reads against the
manifest. Implementations: ``local.LocalStore`` (a local or shared POSIX folder; publish by
rename) and ``s3.S3Store`` (``s3://bucket/prefix``; publish by a conditional put of a marker).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cairn.checkpoint.errors import CheckpointError
from cairn.checkpoint.layout import Leftover
from cairn.checkpoint.local import LocalStore

# URI schemes that name an object store; anything else (no scheme) is a local path.
OBJECT_SCHEMES = ("s3",)
# A path that begins like one (``s3:/bucket``, ``S3:bucket``) but lacks the ``//``: a typo, not a folder name.
_SCHEME_LIKE = re.compile(r"^(s3):(?!//)", re.IGNORECASE)


@runtime_checkable
class CheckpointStore(Protocol):
    """What a place that holds checkpoints offers. Steps are named by number; ``url`` names the place."""

    scheme: str

    @property
    def url(self) -> str: ...

    def exists(self) -> bool:
        """Whether the place exists yet (a new run's folder may not)."""

    def committed_steps(self) -> list[int]:
        """Ascending committed steps; nothing half-written or half-deleted is ever listed."""

    def step_url(self, step: int) -> str:
        """Where step ``step`` lives, for logs, messages and ``cairn checkpoint``."""

    def read_manifest(self, step: int) -> dict | None:
        """The step's manifest (None: a stock DCP step without one); CorruptCheckpointError if damaged."""

    def writer(self, step: int, info: Mapping[str, Any] | None = None, *, checksums: bool = True,
               **options: Any):
        """A DCP StorageWriter that commits step ``step`` in its ``finish`` (build it on every rank)."""

    def reader(self, step: int, verify: bool = False):
        """A DCP StorageReader of step ``step`` that never runs code from it and checks what it reads."""

    def load(self, state_dict: dict[str, Any], step: int, *, verify: bool = False, planner=None,
             process_group=None, no_dist: bool = False):
        """``dcp.load`` of step ``step`` into ``state_dict``; a CheckpointError on any rank is raised on all."""

    def staged_dir(self, step: int, info: Mapping[str, Any] | None = None, *, tag: str = "export",
                   storage: str | None = None) -> contextlib.AbstractContextManager[Path]:
        """A local folder whose files are committed as step ``step`` when the block succeeds."""

    def local_copy(self, step: int) -> contextlib.AbstractContextManager[Path]:
        """A local folder holding step ``step``'s files (verified), for readers that need files."""

    def verify(self, step: int, checksums: bool = True, progress: Callable[[int, int], None] | None = None,
               notes: list[str] | None = None) -> list[str]:
        """Every problem of step ``step`` against its manifest, each naming its file; [] if sound."""

    def delete(self, step: int, pacer=None) -> bool:
        """Make step ``step`` invisible, then remove its files; False (logged) if it could not."""

    def leftovers(self) -> list[Leftover]:
        """What crashed saves, deletes and probes left behind; never a committed step (``cairn checkpoint ls``)."""

    def remove_leftover(self, leftover: Leftover) -> Any:
        """Remove one of ``leftovers()`` (holding the lease)."""

    def cleanup_incomplete(self, protect=(), background: bool = False) -> list:
        """Remove every leftover but those of steps in ``protect`` (one rank, holding the lease:
        a run's start, ``cairn checkpoint clean``); ``background``: out of a new save's way now,
        deleted on a thread (``cleanup_thread``)."""

    def check_writable(self) -> None:
        """Raise CheckpointError naming the place if a save could not be written and committed there."""

    # The folder's lease (``lease.py``): one record, created only if absent, replaced only if it
    # is still the version given (None: the condition failed; a compare-and-swap: of contenders
    # that read one version, exactly one replaces it), deleted only if still that version.

    def lease_read(self) -> tuple[dict, str] | None:
        """(the lease record, its version), or None when there is none (a released lease is a
        record that says so)."""

    def lease_create(self, record: dict) -> str | None:
        """Create the lease if none exists: its version, or None."""

    def lease_replace(self, record: dict, version: str) -> str | None:
        """Replace the lease if its version is still ``version``: the new version, or None."""

    def lease_delete(self, version: str) -> None:
        """Delete the lease if its version is still ``version``."""

    def lease_age(self, version: str) -> float | None:
        """Seconds since the lease's version ``version`` was written, measured on the storage's own
        clock (never a clock of the host that wrote it), or None if that version is gone."""

    def set_fence(self, fence: Callable[[], None] | None) -> None:
        """The commit fence: every commit into this store (a DCP save's, ``staged_dir``'s) calls
        ``fence()`` right before it publishes, and publishes nothing if it raises. The holder of
        the folder's lease passes ``FolderLease.confirm``; None removes it."""


def malformed_location(location: str | os.PathLike) -> str | None:
    """Why ``location`` is neither a local path nor a well-formed object-store URI (``s3:/x``,
    ``s3:bucket``, ``s3://`` without a bucket, another scheme), else None."""
    text = os.fspath(location)
    if "://" in text:
        scheme = text.split("://", 1)[0].lower()
        if scheme not in OBJECT_SCHEMES:
            return (f"{text}: unsupported storage scheme {scheme}://; cairn stores checkpoints in a local or shared "
                    "folder, or in S3-compatible object storage (s3://bucket/prefix)")
        try:
            _s3_client().parse_uri(text)
        except CheckpointError as e:
            return str(e)
        return None
    match = _SCHEME_LIKE.match(text)
    if match:
        return f"{text}: not a valid {match.group(1)}:// URI (expected {match.group(1).lower()}://bucket/prefix)"
    return None


def is_object_uri(location: str | os.PathLike) -> bool:
    """Whether ``location`` names an object store (``s3://bucket/prefix``) rather than a local path."""
    text = os.fspath(location)
    return isinstance(text, str) and "://" in text and text.split("://", 1)[0].lower() in OBJECT_SCHEMES


def open_store(location: str | os.PathLike, *, base_folder: str | os.PathLike | None = None,
               s3_unsafe_no_conditional_writes: bool = False) -> CheckpointStore:
    """The store for a local path (relative ones resolve against ``base_folder``) or an
    ``s3://bucket/prefix`` URI. A malformed URI (``s3:/bucket``) or another scheme is one clear
    error, never a local folder named after it. ``s3_unsafe_no_conditional_writes``: accept an
    object store that does not honour conditional writes (see ``s3_conditions``)."""
    text = os.fspath(location)
    problem = malformed_location(text)
    if problem is not None:
        raise CheckpointError(problem)
    if is_object_uri(text):
        return _s3().S3Store.from_uri(text, unsafe_no_conditional_writes=s3_unsafe_no_conditional_writes)
    path = Path(text)
    if base_folder is not None and not path.is_absolute():
        path = Path(base_folder) / path
    return LocalStore(path)


def open_step(location: str | os.PathLike, what: str) -> tuple[CheckpointStore, Any]:
    """(store, step) for one DCP checkpoint named by a path or URI (``Config.initial_load_path``):
    a local step folder, a committed cairn step in object storage, or a plain DCP prefix there.
    ``step`` is what the store's ``reader``/``load`` take. ``what`` names the flag in messages."""
    text = os.fspath(location)
    problem = malformed_location(text)
    if problem is not None:
        raise CheckpointError(f"{what} {problem}")
    if is_object_uri(text):
        return _s3().step_store(text, what)
    path = Path(text)
    if not path.exists():
        raise CheckpointError(f"{what} {path}: no such directory")
    if not path.is_dir():
        raise CheckpointError(f"{what} {path} is a file; it must be a DCP checkpoint folder (a step-N folder), or "
                              "with Config.initial_load_in_hf a Hugging Face folder")
    return LocalStore(path.parent), path


@contextlib.contextmanager
def local_folder(location: str | os.PathLike, what: str) -> Iterator[Path]:
    """A local folder with the files at ``location``: the path itself, or (an object-store URI) a
    verified download of what is there into a temporary folder, removed afterwards. ``what``
    names the flag or argument for messages."""
    if not is_object_uri(location):
        yield Path(location)
        return
    with _s3().download_prefix(os.fspath(location), what) as path:
        yield path


@contextlib.contextmanager
def local_output(location: str | os.PathLike | None) -> Iterator[Path | None]:
    """Where a tool writes its output: the local path itself, or (an object-store URI) a path in a
    temporary folder whose result is uploaded to the URI when the block succeeds."""
    if location is None or not is_object_uri(location):
        yield None if location is None else Path(location)
        return
    with tempfile.TemporaryDirectory(prefix="cairn-output-") as scratch:
        result = Path(scratch) / "output"
        yield result
        upload_local(result, os.fspath(location))


@contextlib.contextmanager
def optional_local_folder(location: str | os.PathLike | None, what: str) -> Iterator[Path | None]:
    """``local_folder`` for an option that may be absent."""
    if location is None:
        yield None
        return
    with local_folder(location, what) as path:
        yield path


def upload_local(local: str | os.PathLike, location: str) -> None:
    """A local file or folder (a conversion's result) to ``location`` in object storage, which must
    not hold anything yet."""
    _s3().upload_path(Path(local), os.fspath(location))


def _s3(module: str = "s3"):
    """The object-store backend, imported on first use: only s3:// locations need boto3."""
    try:
        return importlib.import_module(f"cairn.checkpoint.{module}")
    except ImportError as e:
        raise CheckpointError(f"s3:// locations need boto3 ({e}); ./run_train.sh installs it, or pip install boto3") \
            from None


def _s3_client():
    return _s3("s3_client")
