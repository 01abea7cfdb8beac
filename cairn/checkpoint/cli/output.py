"""What ``cairn checkpoint`` prints: colours, sizes, times, 80-column tables, wrapped lines.

Imports nothing heavy (no torch), like the parser, so ``cairn --help`` answers at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import sys
import textwrap
import time
from collections.abc import Callable, Iterable
from typing import Any

WIDTH = 80
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
KIND_NAMES = {"full": "full", "model_only": "model-only", "seed": "seed", "hf": "HF"}
_SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64", "int64": "i64",
                 "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "bool",
                 "float8_e4m3fn": "fp8", "float8_e5m2": "fp8e5"}
_LAYOUT_NAMES = (("dp_replicate", "rep"), ("dp_shard", "fsdp"), ("cp", "cp"), ("tp", "tp"), ("pp", "pp"), ("ep", "ep"))


def details(error: BaseException) -> list[str]:
    """The lines of an error message after its first, indented, at most 14."""
    lines = str(error).strip().splitlines()[1:]
    return [line if line.startswith(" ") else "  " + line for line in lines][:14]




class Style:
    """ANSI colours, or plain text when off (not a terminal, NO_COLOR, --color never)."""

    _CODES = {"red": "31", "green": "32", "yellow": "33", "bold": "1", "dim": "2"}

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __getattr__(self, name: str) -> Callable[[str], str]:
        code = self._CODES.get(name)
        if code is None:
            raise AttributeError(name)
        return lambda text: f"\x1b[{code}m{text}\x1b[0m" if self.enabled and text else text


def use_color(mode: str, stream=None) -> bool:
    if mode == "always":
        return True
    if mode == "never" or os.environ.get("NO_COLOR"):
        return False
    stream = stream or sys.stdout
    return bool(getattr(stream, "isatty", lambda: False)())


def show_progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def human_bytes(num_bytes: float | None) -> str:
    if num_bytes is None:
        return "-"
    value = float(num_bytes)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} PB"  # pragma: no cover


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def short_dtype(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    return _SHORT_DTYPES.get(name, name)


def shape_text(shape: Iterable[int] | None) -> str:
    if shape is None:
        return "-"
    shape = list(shape)
    return "x".join(str(n) for n in shape) if shape else "scalar"


def layout_text(layout: dict | None) -> str:
    """``{"world_size": 4, "dp_shard": 2, "tp": 2, ...}`` -> ``fsdp2 tp2``; ``ws1`` for one process."""
    if not layout:
        return "-"
    parts = [f"{short}{layout[key]}" for key, short in _LAYOUT_NAMES if int(layout.get(key, 1) or 1) > 1]
    return " ".join(parts) if parts else f"ws{layout.get('world_size', 1)}"


def local_time(unix: float | None, with_seconds: bool = False) -> str:
    if unix is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S" if with_seconds else "%m-%d %H:%M", time.localtime(unix))


def iso_time(unix: float | None) -> str | None:
    if unix is None:
        return None
    return datetime.datetime.fromtimestamp(unix, datetime.timezone.utc).isoformat(timespec="seconds")


def elide(text: str, width: int) -> str:
    """``text`` cut in the middle to ``width`` characters (keys keep their head and tail)."""
    if len(text) <= width:
        return text
    if width <= 3:
        return text[:width]
    head = (width - 2) // 2
    return text[:head] + ".." + text[len(text) - (width - 2 - head):]


def wrapped(text: str, indent: str = "  ", width: int = WIDTH) -> list[str]:
    return textwrap.wrap(text, width=width, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_long_words=True, break_on_hyphens=False) or [indent]


@dataclasses.dataclass
class Column:
    header: str
    width: int
    right: bool = False

    def cell(self, text: str) -> str:
        text = elide(text, self.width)
        return text.rjust(self.width) if self.right else text.ljust(self.width)


def table_line(columns: list[Column], cells: list[str], styles: list[Callable[[str], str] | None] | None = None,
               indent: str = "") -> str:
    """One row; ``styles`` colour each padded cell, so colour codes never change the widths."""
    parts = []
    for i, (column, text) in enumerate(zip(columns, cells)):
        padded = column.cell(text)
        style = styles[i] if styles else None
        parts.append(style(padded) if style else padded)
    return (indent + " ".join(parts)).rstrip()
