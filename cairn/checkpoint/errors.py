"""The errors of checkpointing, and how to find the one a user can act on behind DCP's wrapper.

A leaf of the checkpoint package: it imports nothing of cairn. Every message names the
file, step, key or flag it is about (see the package's invariants in docs/design.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

# Problems listed in one error message before "... and N more".
SHOWN_PROBLEMS = 5


class CheckpointError(Exception):
    """A checkpoint problem the user can act on; the message names the file, step or flag."""


class CheckpointConfigError(CheckpointError, ValueError):
    """A ``CheckpointManager.Config`` with problems; ``problems`` lists each, naming its field."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        count = len(self.problems)
        super().__init__(f"invalid CheckpointManager.Config ({count} problem{'s' if count != 1 else ''}):\n  - "
                         + "\n  - ".join(self.problems))

    def __reduce__(self):
        return (type(self), (self.problems,))


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files do not match what was written; ``problems`` lists each one."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems)

    def __reduce__(self):  # DCP pickles rank failures to the coordinator
        return (type(self), (str(self), self.problems))


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file that would run code if loaded the stock way; it was refused unread."""


class HFCheckpointError(CheckpointError, ValueError):
    """A Hugging Face checkpoint that cannot be read or written; the message names the file or key."""


class SaveError(CheckpointError):
    """A save that failed; the message names the folder and the cause, and says nothing was committed."""


class WriterDiedError(SaveError):
    """An async save's writer process died (a signal, the OOM killer): that save is lost, nothing
    else. Training can go on; the next save starts a new writer process."""


def corrupt_error(where: str | os.PathLike, problems: Sequence[str]) -> CorruptCheckpointError:
    """One CorruptCheckpointError for the step at ``where``, listing its first problems."""
    problems = list(problems)
    shown = problems[:SHOWN_PROBLEMS] + (
        [f"... and {len(problems) - SHOWN_PROBLEMS} more"] if len(problems) > SHOWN_PROBLEMS else [])
    return CorruptCheckpointError(
        f"checkpoint {where} is corrupt:\n  - " + "\n  - ".join(shown)
        + f"\n(details: `cairn checkpoint verify {where}`)", problems)


def find_checkpoint_error(exc: BaseException) -> CheckpointError | None:
    """The CheckpointError behind ``exc``, also from inside DCP's per-rank CheckpointException."""
    if isinstance(exc, CheckpointError):
        return exc
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict):
        for rank in sorted(failures):
            error = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
            if isinstance(error, CheckpointError):
                return error
    cause = exc.__cause__
    if isinstance(cause, CheckpointError):
        return cause
    return None


def user_error(exc: BaseException, *sources: object) -> BaseException:
    """The error to show for a failed DCP call: a reader's or writer's own ``last_error`` (the
    first of ``sources`` that has one), else a CheckpointError inside DCP's wrapper, else the
    one rank's error of a single-process call, else ``exc`` itself."""
    for source in sources:
        error = getattr(source, "last_error", None)
        if error is not None:
            return error
    found = find_checkpoint_error(exc)
    if found is not None:
        return found
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and len(failures) == 1:
        failure = next(iter(failures.values()))
        error = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(error, BaseException):
            return error
    return exc


def reraise_user_error(exc: BaseException, *sources: object) -> None:
    """Raise ``user_error(exc, *sources)`` from ``exc`` (or ``exc`` itself when that is it)."""
    error = user_error(exc, *sources)
    if error is exc:
        raise exc
    raise error from exc


# --- the checkpoint tools' exit statuses (``cairn checkpoint``, the readers behind it) ----------------

class UsageError(Exception):
    """Exit 2: a missing path, something that is not a checkpoint, a bad combination of options."""

    def __init__(self, what: str, path: str | os.PathLike | None = None):
        super().__init__(what)
        self.what, self.path = what, path


class CheckFailed(Exception):
    """Exit 1: the checkpoint is corrupt or unsafe to read."""

    def __init__(self, what: str, path: str | os.PathLike | None = None):
        super().__init__(what)
        self.what, self.path = what, path


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name if it has none)."""
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
