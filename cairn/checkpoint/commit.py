"""The local commit: make a complete staging directory visible as ``step-N`` in one atomic step.

``publish_staging`` renames ``.tmp-step-N`` to ``step-N``. Replacing an existing ``step-N``
swaps the two directories atomically with Linux ``renameat2(RENAME_EXCHANGE)``; where that
call is missing (not Linux, old glibc, a filesystem without it), the old copy is first
renamed to ``.replaced-step-N``, which readers treat as step N until the new one is in
place and which start-up cleanup restores if a crash hits between the two renames.

An object store has no rename: its commit is a marker object (see ``s3.py``); the memory
tier's is a record written after the slot (see ``memory.py``).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

from cairn.checkpoint import fsio
from cairn.checkpoint.faults import fault_point
from cairn.checkpoint.layout import aside_name, step_name

logger = logging.getLogger("cairn")


def publish_staging(folder: Path, staging: Path, step: int) -> Path:
    """Atomically make the complete directory ``staging`` visible as ``folder/step-<step>``.

    ``staging`` must be in ``folder`` (a rename never crosses filesystems). An existing
    ``step-N`` is replaced with no moment where neither copy is a committed step N.
    """
    final = folder / step_name(step)
    fault_point("during_publish")
    try:
        os.rename(staging, final)  # replaces ``final`` only if it is an empty directory
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        _replace(folder, staging, final, step)
    fsio.fsync_dir(folder)
    return final


def _replace(folder: Path, staging: Path, final: Path, step: int) -> None:
    if fsio.exchange(staging, final):
        # The new step is live under ``final``; ``staging`` now holds the previous copy.
        fsio.fsync_dir(folder)
        fault_point("during_replace")
        logger.info("replaced existing %s", final)
        fsio.discard(staging)
        return
    aside = folder / aside_name(step)
    if aside.exists():  # stale: ``final`` exists, so the aside copy is a leftover
        fsio.remove_tree(aside)
    os.rename(final, aside)
    fault_point("during_replace")
    os.rename(staging, final)
    fsio.fsync_dir(folder)
    logger.info("replaced existing %s (two renames; renameat2 RENAME_EXCHANGE unavailable)", final)
    fsio.discard(aside)
