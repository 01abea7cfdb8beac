"""The save planner of cairn's background saves: DCP's default plan, made cheap to repeat.

An async save's planning runs in the training process, beside the training thread, and every
millisecond of Python it runs is a millisecond the training thread may wait for the GIL. Two
costs repeat at every save although nothing about them changes between saves:

- **Non-tensor values.** DCP writes every non-tensor entry of the state dict with
  ``torch.save`` into its own small zip record. With ``flatten_optimizer_state_dict`` the
  optimizer's param-group settings become one entry per parameter and setting (1B: about
  1,800 of the save's 2,400 items, 0.1 ms each). ``torch.save`` is deterministic for a plain
  value, so the bytes are kept per value (``BytesMemo``) and each later save looks them up.
- **The plans.** Every save gathers each rank's local plan on the coordinator and scatters
  the global plan back, pickling both ways. DCP's plan caching (``enable_plan_caching``,
  which torch 2.13 has) sends nothing when a rank's plan is the one it sent last time
  and reuses the global plan and metadata; it is turned on where the installed torch has it.

Neither changes a byte on disk: the files of a cached-plan save equal those of a fresh one
(tests/unit/test_planner.py checks both against saves by DCP's default planner).
"""

from __future__ import annotations

import inspect
import io
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

_PLAIN = (bool, int, float, complex, str, bytes, type(None))
PLAN_CACHING = "enable_plan_caching" in inspect.signature(DefaultSavePlanner.__init__).parameters


def _plain(value: Any, depth: int = 0) -> bool:
    """A value whose pickle fixes its ``torch.save`` bytes: plain scalars, and tuples/lists of them."""
    if type(value) in _PLAIN:  # not a subclass (an IntEnum, say): it may pickle its own way
        return True
    if type(value) in (tuple, list) and depth < 2 and len(value) <= 16:
        return all(_plain(v, depth + 1) for v in value)
    return False


class BytesMemo:
    """``torch.save`` output of plain values, keyed by the value's pickle and the zip CRC setting."""

    MAX_ENTRIES = 65536  # a run whose values never repeat (a step counter) must not grow it forever

    def __init__(self) -> None:
        self._bytes: dict[tuple[bool, bytes], bytes] = {}
        self.hits = 0
        self.misses = 0

    def serialize(self, value: Any) -> io.BytesIO | None:
        """The bytes DCP would write for ``value``, or None for a value this memo does not keep."""
        if not _plain(value):
            return None
        key = (torch.serialization.get_crc32_options(), pickle.dumps(value, protocol=4))
        data = self._bytes.get(key)
        if data is None:
            self.misses += 1
            buffer = io.BytesIO()
            torch.save(value, buffer)
            data = buffer.getvalue()
            if len(self._bytes) >= self.MAX_ENTRIES:
                self._bytes.clear()
            self._bytes[key] = data
        else:
            self.hits += 1
        return io.BytesIO(data)


class CairnSavePlanner(DefaultSavePlanner):
    """DCP's default save plan; non-tensor values from a ``BytesMemo``, plans cached where DCP can."""

    def __init__(self, memo: BytesMemo, **options: Any):
        if PLAN_CACHING:
            options.setdefault("enable_plan_caching", True)
        super().__init__(**options)
        self.memo = memo

    def transform_object(self, write_item: WriteItem, object: Any):  # noqa: A002 - DCP's signature
        if write_item.type == WriteItemType.BYTE_IO:
            data = self.memo.serialize(object)
            if data is not None:
                return data
        return super().transform_object(write_item, object)
