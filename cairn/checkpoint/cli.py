"""``cairn checkpoint ...``: the user's view of checkpoints.

    cairn checkpoint ls <folder>                  the steps in a checkpoint folder, newest first
    cairn checkpoint inspect <step_dir>           what a step holds: keys, shapes, dtypes, files
    cairn checkpoint verify <step_dir | folder>   checksums of every file; exit 1 if corrupt
    cairn checkpoint diff <a> <b>                 per-tensor differences; exit 1 if different
    cairn checkpoint convert <src> <dst> --to {dcp,hf,torch}
    cairn checkpoint plot <run_dir>... -o loss.png

Every command reads DCP step folders, Hugging Face directories and single ``.pt`` files
alike, and none runs code from a checkpoint: DCP metadata goes through cairn's allowlist
unpickler, non-tensor values through ``torch.load(weights_only=True)``, safetensors
through their JSON headers. Tensors are read a batch at a time (``diff``, ``convert``),
never two whole checkpoints at once.

Exit status: 0 fine, 1 the checkpoint is corrupt or unsafe (``diff``: different), 2 a
usage error (missing path, not a checkpoint, bad option). Errors are one line,
``cairn checkpoint <cmd>: <what> (<path>)``, never a traceback. Output fits 80 columns;
colours only on a terminal, never with ``NO_COLOR`` set; progress bars go to stderr and
only to a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import re
import shutil
import sys
import textwrap
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from cairn.checkpoint.readers import (  # noqa: F401 - part of this module's interface too
    GROUPS,
    READ_BATCH_BYTES,
    CheckFailed,
    DcpCheckpoint,
    Entry,
    HfAsFqns,
    HfCheckpoint,
    TorchCheckpoint,
    UsageError,
    _dcp_error,
    _file_order,
    _first_line,
    _flatten,
    _progress_bar,
    _quiet_dcp,
    detect_format,
    display_path,
    group_of,
    is_step_folder,
    open_checkpoint,
    read_batches,
    read_manifest_quietly,
)

WIDTH = 80
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
FORMATS = ("dcp", "hf", "torch")
KIND_NAMES = {"full": "full", "model_only": "model-only", "seed": "seed", "hf": "HF"}
_SHORT_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64", "int64": "i64",
                 "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "bool",
                 "float8_e4m3fn": "fp8", "float8_e5m2": "fp8e5"}
_LAYOUT_NAMES = (("dp_replicate", "rep"), ("dp_shard", "fsdp"), ("tp", "tp"), ("pp", "pp"))

logger = logging.getLogger("cairn")


# --- output: colours, sizes, tables ------------------------------------------------------------


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


def _details(error: BaseException) -> list[str]:
    lines = str(error).strip().splitlines()[1:]
    return [line if line.startswith(" ") else "  " + line for line in lines][:14]


# --- ls ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StepRow:
    """One line of ``ls``: a committed step, or the leftover of a save that did not finish."""

    name: str
    path: Path
    step: int
    committed: bool
    kind: str | None = None
    storage: str | None = None
    checked: str | None = None  # "checksums", "sizes", "structure" or None (not checked)
    problems: list[str] = dataclasses.field(default_factory=list)
    dtype: str | None = None
    num_bytes: int = 0
    num_files: int = 0
    layout: dict | None = None
    model: dict | None = None
    created: float | None = None
    leftover: str | None = None  # why an uncommitted dir is there

    def to_json(self) -> dict:
        return {"step": self.step, "name": self.name, "path": str(self.path), "committed": self.committed,
                "kind": self.kind, "storage": self.storage, "status": self.status, "checked": self.checked,
                "problems": self.problems, "dtype": self.dtype, "bytes": self.num_bytes, "files": self.num_files,
                "layout": self.layout, "model": self.model, "created": iso_time(self.created),
                "leftover": self.leftover}

    @property
    def status(self) -> str:
        if not self.committed:
            return "uncommitted"
        return "corrupt" if self.problems else "ok"


def _disk_usage(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path``."""
    total = count = 0
    for root, _, names in os.walk(path):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
                count += 1
    return total, count


def _model_dtype(manifest: dict | None, path: Path) -> str | None:
    """The dtype(s) of the model weights (the manifest's per-key entries, else the step's own record)."""
    entries = (manifest or {}).get("entries")
    if isinstance(entries, dict):
        dtypes = sorted({e.get("dtype") for key, e in entries.items()
                         if isinstance(e, dict) and e.get("type") == "tensor" and group_of(key) == "model"} - {None})
        if dtypes:
            return ",".join(dtypes)
    if manifest and manifest.get("dtype") not in (None, "mixed"):
        return manifest["dtype"]
    if manifest is None and (path / ".metadata").is_file():
        with contextlib.suppress(Exception):
            entries = DcpCheckpoint(path, tolerate_corrupt=True).entries()
            dtypes = sorted({str(e.dtype).removeprefix("torch.") for e in entries.values()
                             if e.is_tensor and e.group == "model"})
            return ",".join(dtypes) or None
    return None


def _committed_row(storage, step: int, checksums: bool, progress: Callable[[int], None] | None) -> StepRow:
    from cairn.checkpoint.storage import is_hf_dir

    path = storage.step_dir(step)
    manifest, problems = read_manifest_quietly(path)
    row = StepRow(path.name, path, step, True)
    row.num_bytes, row.num_files = _disk_usage(path)
    done = 0

    def advance(now: int, total: int) -> None:
        nonlocal done
        if progress is not None:
            progress(now - done)
        done = now

    notes: list[str] = []
    row.problems = problems or storage.verify(path, checksums=checksums, progress=advance, notes=notes)
    if manifest is not None:
        row.kind = manifest.get("kind") or ("seed" if step == 0 else None)
        row.storage = manifest.get("storage")
        row.layout, row.model = manifest.get("layout"), manifest.get("model")
        row.created = manifest.get("created_unix")
        with_sums = checksums and manifest.get("checksum_algorithm") is not None
        row.checked = "checksums" if with_sums else "sizes"
    else:
        row.storage = "hf" if is_hf_dir(path) else "dcp"
        row.checked = "structure"
    row.dtype = _model_dtype(manifest, path)
    if row.created is None:
        with contextlib.suppress(OSError):
            row.created = path.stat().st_mtime
    return row


def _leftover_rows(folder: Path, committed: set[Path]) -> list[StepRow]:
    """Uncommitted dirs: staging dirs of crashed saves, interrupted deletes, step dirs without a commit marker."""
    from cairn.checkpoint.storage import _ASIDE_RE, _STAGING_RE, _STEP_RE, _TRASH_PREFIX

    rows = []
    for path in sorted(folder.iterdir()):
        if not path.is_dir() or path in committed:
            continue
        name = path.name
        if match := _STAGING_RE.match(name):
            why = "staging dir of a save in progress or one that did not finish"
        elif match := _ASIDE_RE.match(name):
            why = "old copy of a replaced step"
        elif match := _STEP_RE.match(name):
            why = "no manifest or .metadata: a save that did not finish"
        elif name.startswith(_TRASH_PREFIX) and (match := re.search(r"step-(\d+)", name)):
            why = "a step being deleted"
        else:
            continue
        row = StepRow(name, path, int(match.group(1)), False, leftover=why)
        row.num_bytes, row.num_files = _disk_usage(path)
        with contextlib.suppress(OSError):
            row.created = path.stat().st_mtime
        rows.append(row)
    return rows


def list_steps(folder: Path, checksums: bool = False, progress_bar: bool = False) -> list[StepRow]:
    """Every step dir and leftover in a checkpoint folder, newest first."""
    from cairn.checkpoint.storage import CheckpointStorage

    storage = CheckpointStorage(folder)
    steps = storage.committed_steps()
    rows = []
    total = 0
    if checksums:
        for step in steps:
            manifest, _ = read_manifest_quietly(storage.step_dir(step))
            total += int((manifest or {}).get("total_bytes") or 0)
    with _progress_bar(total, "checksums", progress_bar and checksums) as advance:
        for step in steps:
            rows.append(_committed_row(storage, step, checksums, advance))
    rows += _leftover_rows(folder, {storage.step_dir(step) for step in steps})
    rows.sort(key=lambda row: (row.step, row.committed, row.name), reverse=True)
    return rows


def resolve_folder(path: Path) -> Path:
    """A checkpoint folder from what the user typed: the folder itself, or a run's dump folder."""
    from cairn.checkpoint.storage import MANIFEST_NAME, METADATA_NAME

    if not path.exists():
        raise UsageError("no such directory", path)
    if not path.is_dir():
        raise UsageError("not a directory", path)
    if (path / METADATA_NAME).exists() or (path / MANIFEST_NAME).exists():
        raise UsageError(f"a single step, not a checkpoint folder: try `cairn checkpoint inspect "
                         f"{display_path(path)}`", path)
    if not is_step_folder(path) and is_step_folder(path / "checkpoint"):
        return path / "checkpoint"  # a run's --job.dump_folder
    return path


LS_COLUMNS = [Column("STEP", 6, right=True), Column("KIND", 10), Column("COMMIT", 6), Column("VERIFY", 11),
              Column("DTYPE", 5), Column("SIZE", 8, right=True), Column("FILES", 5, right=True),
              Column("LAYOUT", 10), Column("CREATED", 11)]


def _verify_cell(row: StepRow, style: Style) -> tuple[str, Callable[[str], str] | None]:
    if not row.committed:
        return "-", None
    if row.problems:
        return "CORRUPT", style.red
    return {"checksums": "checksummed", "sizes": "sizes ok", "structure": "struct ok"}.get(row.checked, "ok"), style.green


def _kind_text(row: StepRow) -> str:
    if not row.committed:
        return "-"
    if row.kind:
        return KIND_NAMES.get(row.kind, row.kind)
    return "HF" if row.storage == "hf" else "dcp"


def format_ls(folder: Path, rows: list[StepRow], style: Style) -> list[str]:
    lines = [style.bold(f"checkpoint folder {elide(display_path(folder), WIDTH - 18)}")]
    if not rows:
        return lines + ["  no checkpoints yet"]
    lines.append(style.dim(table_line(LS_COLUMNS, [c.header for c in LS_COLUMNS])))
    for row in rows:
        verify, verify_style = _verify_cell(row, style)
        dtypes = ",".join(short_dtype(d) for d in row.dtype.split(",")) if row.dtype else "-"
        cells = [f"{row.step}" + ("" if row.committed else "*"), _kind_text(row), "yes" if row.committed else "no",
                 verify, dtypes, human_bytes(row.num_bytes), str(row.num_files), layout_text(row.layout),
                 local_time(row.created)]
        styles = [None, None, None if row.committed else style.yellow, verify_style] + [None] * 5
        lines.append(table_line(LS_COLUMNS, cells, styles))
    committed = [row for row in rows if row.committed]
    corrupt = [row for row in committed if row.problems]
    summary = (f"{plural(len(committed), 'committed step')}, {human_bytes(sum(r.num_bytes for r in rows))} on disk"
               + (f"; {len(corrupt)} corrupt" if corrupt else ""))
    lines.append(summary)
    for row in rows:
        if not row.committed:
            lines += wrapped(f"{row.step}*: {row.name}: {row.leftover} (never loaded; a leftover is removed at "
                             "the next training start)", indent="")
    for row in corrupt:
        lines += wrapped(f"step {row.step}: {_relative_to_step(row.problems[0], row.path)}", indent="")
    checks = {row.checked for row in committed}
    if "sizes" in checks or "structure" in checks:
        lines += wrapped("sizes ok: every file has the size its manifest records; `--checksums` or `cairn "
                         "checkpoint verify` hashes every byte.", indent="")
    return lines


def cmd_ls(args: argparse.Namespace) -> int:
    folder = resolve_folder(Path(args.folder))
    rows = list_steps(folder, checksums=args.checksums, progress_bar=show_progress(args))
    if args.json:
        print(json.dumps({"folder": str(folder), "steps": [row.to_json() for row in rows]}, indent=1))
    else:
        print("\n".join(format_ls(folder, rows, Style(use_color(args.color)))))
    return EXIT_OK  # a listing, even of corrupt steps; `verify` is the command that judges


# --- inspect ---------------------------------------------------------------------------------------

# Non-tensor values of a group are listed when there are at most this many (--all lists every one).
LISTED_VALUES_PER_GROUP = 16


def _describe(ckpt) -> str:
    manifest = ckpt.manifest or {}
    if ckpt.format == "torch":
        return "torch.save file"
    kind = KIND_NAMES.get(manifest.get("kind", ""), manifest.get("kind"))
    step = manifest.get("step")
    of_step = f" of step {step}" if step is not None else ""
    if ckpt.format == "hf":
        return f"Hugging Face directory, cairn {kind or 'HF'} export{of_step}" if manifest else \
            "Hugging Face directory"
    if not manifest:
        return "DCP checkpoint (no cairn manifest)"
    return f"DCP, {kind or 'full'} checkpoint{of_step}"


def _header(ckpt, entries: dict[str, Entry]) -> list[tuple[str, str]]:
    """(label, text) lines about the checkpoint as a whole."""
    manifest = ckpt.manifest or {}
    lines = []
    model = manifest.get("model")
    if isinstance(model, dict) and model.get("name"):
        lines.append(("model", f"{model['name']} {model.get('flavor') or ''}".strip()))
    config = getattr(ckpt, "config", None)
    if isinstance(config, dict):
        arch = (config.get("architectures") or [config.get("model_type", "?")])[0]
        lines.append(("config", f"{arch}, hidden {config.get('hidden_size')}, {config.get('num_hidden_layers')} "
                                f"layers, vocab {config.get('vocab_size')}, {config.get('torch_dtype', '?')}"))
    if manifest.get("layout"):
        layout = manifest["layout"]
        lines.append(("saved by", f"{layout.get('world_size', '?')} process(es), layout {layout_text(layout)}"))
    if manifest.get("created_unix"):
        lines.append(("created", f"{local_time(manifest['created_unix'], with_seconds=True)}, torch "
                                 f"{manifest.get('torch_version', '?')}, cairn {manifest.get('cairn_version', '?')}"))
    if ckpt.path.is_dir():
        num_bytes, num_files = _disk_usage(ckpt.path)
    else:
        num_bytes, num_files = ckpt.path.stat().st_size, 1
    integrity = (f"manifest with {manifest['checksum_algorithm']} checksums" if manifest.get("checksum_algorithm")
                 else "manifest, sizes only" if manifest else "no cairn manifest: no checksums")
    lines.append(("files", f"{num_files}, {human_bytes(num_bytes)} on disk; {integrity}"))
    return lines


def _group_totals(entries: Iterable[Entry]) -> dict[str, dict[str, int]]:
    totals: dict[str, dict[str, int]] = {}
    for entry in entries:
        total = totals.setdefault(entry.group, {"tensors": 0, "tensor_bytes": 0, "values": 0, "value_bytes": 0})
        if entry.is_tensor:
            total["tensors"] += 1
            total["tensor_bytes"] += entry.num_bytes
        else:
            total["values"] += 1
            total["value_bytes"] += entry.num_bytes
    return {group: totals[group] for group in GROUPS if group in totals}


def _value_text(value: Any) -> str:
    import torch

    if isinstance(value, torch.Tensor):
        return f"tensor {shape_text(value.shape)} {short_dtype(value.dtype)}"
    return repr(value)


def _jsonable(value: Any) -> Any:
    import torch

    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, torch.Tensor):
        return {"tensor": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def _files_text(files: list[str]) -> str:
    if not files:
        return "-"
    return files[0] if len(files) == 1 else f"{len(files)} files"


def format_inspect(ckpt, entries: dict[str, Entry], values: dict[str, Any], style: Style,
                   list_all: bool) -> list[str]:
    description = _describe(ckpt)
    lines = [style.bold(f"{elide(display_path(ckpt.path), WIDTH - 2 - len(description))}: {description}")]
    for label, text in _header(ckpt, entries):
        lines += wrapped(f"{label:<9} {text}")
    for problem in ckpt.problems:
        lines += [style.red(line) for line in wrapped(f"CORRUPT: {_relative_to_step(problem, ckpt.path)}")]
    data_files = sorted({name for e in entries.values() for name in e.files}, key=_file_order)
    if len(data_files) == 1:  # the usual one-process save: name the file once instead of on every row
        lines += wrapped(f"{'data':<9} every key is in {data_files[0]}")
    shape_width = min(16, max([len(shape_text(e.shape)) for e in entries.values() if e.is_tensor] + [5]))
    fixed = [Column("SHAPE", shape_width, right=True), Column("DTYPE", 8), Column("BYTES", 8, right=True)]
    if len(data_files) > 1:
        fixed.append(Column("FILE", min(14, max(len(_files_text(e.files)) for e in entries.values()))))
    key_width = WIDTH - 2 - sum(c.width + 1 for c in fixed)
    columns = [Column("KEY", key_width)] + fixed
    lines.append(style.dim(table_line(columns, [c.header for c in columns], indent="  ")))
    totals = _group_totals(entries.values())
    for group, total in totals.items():
        lines.append(style.bold(_group_heading(group, total)))
        members = [e for e in entries.values() if e.group == group]
        list_values = list_all or bool(values) or total["values"] <= LISTED_VALUES_PER_GROUP
        prefix = "" if group == "model" else group + "."
        for entry in members:
            if not entry.is_tensor and not list_values:
                continue
            lines += _entry_lines(entry, entry.key.removeprefix(prefix), columns, values)
        if not list_values and total["values"]:
            lines.append(style.dim(f"  ... and {plural(total['values'], 'other value')}, "
                                   f"{human_bytes(total['value_bytes'])} "
                                   "(--all lists them, --values shows them)"))
    num_tensors = sum(t["tensors"] for t in totals.values())
    num_values = sum(t["values"] for t in totals.values())
    tensor_bytes = sum(t["tensor_bytes"] for t in totals.values())
    lines.append(style.bold(f"total: {plural(num_tensors, 'tensor')}, {human_bytes(tensor_bytes)}"
                            + (f"; {plural(num_values, 'other value')}" if num_values else "")))
    return lines


def _group_heading(group: str, total: dict[str, int]) -> str:
    name = "model" if group == "model" else f"{group}.*"
    parts = [f"{plural(total['tensors'], 'tensor')}, {human_bytes(total['tensor_bytes'])}"] if total["tensors"] else []
    if total["values"]:
        parts.append(plural(total["values"], "other value"))
    return f"{name} ({'; '.join(parts)})"


def _entry_lines(entry: Entry, key: str, columns: list[Column], values: dict[str, Any]) -> list[str]:
    key_width = columns[0].width
    if entry.is_tensor:
        cells = [shape_text(entry.shape), str(entry.dtype).removeprefix("torch."), human_bytes(entry.num_bytes),
                 _files_text(entry.files)]
    elif entry.key in values:
        text = f"  {key} = {_value_text(values[entry.key])}"
        return [elide(text, WIDTH)]
    else:
        cells = ["", "value", human_bytes(entry.num_bytes) if entry.num_bytes else "-", _files_text(entry.files)]
    cells = cells[:len(columns) - 1]  # no FILE column when one file holds everything
    if len(key) <= key_width:
        return [table_line(columns, [key] + cells, indent="  ")]
    # A long key gets a line of its own; its details go on the next line, under their columns.
    return ["  " + elide(key, WIDTH - 2), table_line(columns, [""] + cells, indent="  ")]


def inspect_json(ckpt, entries: dict[str, Entry], values: dict[str, Any]) -> dict:
    manifest = ckpt.manifest or {}
    header = {k: manifest.get(k) for k in ("step", "kind", "storage", "dtype", "layout", "model", "created",
                                             "torch_version", "cairn_version", "checksum_algorithm") if k in manifest}
    return {
        "path": str(ckpt.path), "format": ckpt.format, **header, "problems": ckpt.problems,
        "groups": _group_totals(entries.values()),
        "entries": [{"key": e.key, "group": e.group, "type": "tensor" if e.is_tensor else "value",
                     "shape": list(e.shape) if e.shape is not None else None,
                     "dtype": str(e.dtype).removeprefix("torch.") if e.dtype is not None else None,
                     "bytes": e.num_bytes, "files": e.files,
                     **({"value": _jsonable(values[e.key])} if e.key in values else {})}
                    for e in entries.values()],
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    path = Path(args.step_dir)
    ckpt = open_checkpoint(path, tolerate_corrupt=True)
    entries = ckpt.entries()
    if args.group:
        unknown = sorted(set(args.group) - set(GROUPS))
        if unknown:
            raise UsageError(f"--group {unknown[0]}: choose from {', '.join(GROUPS)}", path)
        entries = {key: e for key, e in entries.items() if e.group in args.group}
    values: dict[str, Any] = {}
    if args.values:
        wanted = [key for key, e in entries.items() if not e.is_tensor]
        if wanted and not ckpt.problems:
            values = ckpt.read(wanted)
    if args.json:
        print(json.dumps(inspect_json(ckpt, entries, values), indent=1))
    else:
        print("\n".join(format_inspect(ckpt, entries, values, Style(use_color(args.color)), args.all)))
    return EXIT_FAILED if ckpt.problems else EXIT_OK


# --- verify ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Verdict:
    path: Path
    checked: str  # "checksums", "sizes", "structure"
    problems: list[str]
    notes: list[str]
    num_bytes: int

    def to_json(self) -> dict:
        return {"path": str(self.path), "status": "corrupt" if self.problems else "ok", "checked": self.checked,
                "problems": self.problems, "notes": self.notes, "bytes": self.num_bytes}


def verify_targets(path: Path) -> list[Path]:
    """The step dirs (or the one file) ``verify <path>`` checks; UsageError if there is none."""
    from cairn.checkpoint.storage import CheckpointStorage

    if not path.exists():
        raise UsageError("no such file or directory", path)
    if path.is_file():
        detect_format(path)
        return [path]
    with contextlib.suppress(UsageError):
        detect_format(path)
        return [path]
    folder = resolve_folder(path)
    storage = CheckpointStorage(folder)
    steps = storage.committed_steps()
    if not steps:
        raise UsageError("no committed checkpoint here: not a step directory or a folder of steps", path)
    return [storage.step_dir(step) for step in reversed(steps)]


def _planned_bytes(path: Path, checksums: bool) -> int:
    if path.is_file():
        return path.stat().st_size if checksums else 0
    manifest, _ = read_manifest_quietly(path)
    return int((manifest or {}).get("total_bytes") or 0) if checksums else 0


def verify_one(path: Path, checksums: bool, advance: Callable[[int], None]) -> Verdict:
    from cairn.checkpoint.storage import CheckpointStorage, is_hf_dir

    if path.is_file():
        return _verify_torch_file(path, advance)
    notes: list[str] = []
    manifest, problems = read_manifest_quietly(path)
    num_bytes = _disk_usage(path)[0]
    if manifest is None and not problems and is_hf_dir(path):
        return Verdict(path, "structure", _hf_structure_problems(path), [
            "no cairn manifest (not written by cairn): safetensors headers and sizes checked, no checksums"],
            num_bytes)
    done = 0

    def progress(now: int, total: int) -> None:
        nonlocal done
        advance(now - done)
        done = now

    problems = problems or CheckpointStorage(path.parent).verify(path, checksums=checksums, progress=progress,
                                                                  notes=notes)
    if manifest is None:
        checked = "structure"
    else:
        checked = "checksums" if checksums and manifest.get("checksum_algorithm") else "sizes"
    return Verdict(path, checked, problems, notes, num_bytes)


def _hf_structure_problems(path: Path) -> list[str]:
    from cairn.checkpoint.hf import HFWeights
    from cairn.checkpoint.storage import CheckpointError

    try:
        HFWeights(path)
    except CheckpointError as e:
        return [_first_line(e)]
    return []


def _verify_torch_file(path: Path, advance: Callable[[int], None]) -> Verdict:
    """A .pt: every record's CRC-32 (zip format), then a weights-only load of its structure."""
    problems: list[str] = []
    checked = "structure"
    if zipfile.is_zipfile(path):
        checked = "checksums"
        try:
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    with archive.open(info) as member:
                        while chunk := member.read(8 << 20):
                            advance(len(chunk))
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            problems.append(f"{path}: {e}")
    if not problems:
        try:
            TorchCheckpoint(path)
        except CheckFailed as e:
            problems.append(f"{path}: {e.what}")
    return Verdict(path, checked, problems, [], path.stat().st_size)


def format_verify(verdicts: list[Verdict], style: Style) -> list[str]:
    lines = []
    for verdict in verdicts:
        if verdict.problems:
            lines.append(f"{style.red('CORRUPT')}  {elide(display_path(verdict.path), WIDTH - 9)}")
            for problem in verdict.problems:  # file names relative to the step named above
                lines += wrapped(f"- {_relative_to_step(problem, verdict.path)}", indent="  ")
        else:
            what = {"checksums": "every checksum matches", "sizes": "sizes match (no checksums run)",
                    "structure": "structure checked (no checksums recorded)"}[verdict.checked]
            detail = f": {human_bytes(verdict.num_bytes)}, {what}"
            name = elide(display_path(verdict.path), WIDTH - 9 - len(detail))
            lines.append(f"{style.green('ok')}       {name}{detail}")
        for note in verdict.notes:
            lines += [style.dim(line) for line in wrapped(f"note: {note}")]
    corrupt = sum(1 for v in verdicts if v.problems)
    if len(verdicts) > 1 or corrupt:
        result = f"{corrupt} of {len(verdicts)} corrupt" if corrupt else f"all {len(verdicts)} ok"
        lines.append(style.bold(f"result: {result}"))
    return lines


def _relative_to_step(problem: str, step: Path) -> str:
    return problem.replace(f"{step}{os.sep}", "") if step.is_dir() else problem


def cmd_verify(args: argparse.Namespace) -> int:
    targets = verify_targets(Path(args.path))
    checksums = not args.quick
    total = sum(_planned_bytes(path, checksums) for path in targets)
    verdicts = []
    with _progress_bar(total, "verify", show_progress(args)) as advance:
        for path in targets:
            verdicts.append(verify_one(path, checksums, advance))
    if args.json:
        print(json.dumps({"ok": not any(v.problems for v in verdicts),
                          "checked": [v.to_json() for v in verdicts]}, indent=1))
    else:
        print("\n".join(format_verify(verdicts, Style(use_color(args.color)))))
    return EXIT_FAILED if any(v.problems for v in verdicts) else EXIT_OK


# --- diff ------------------------------------------------------------------------------------------


# Rows ``diff`` prints for keys that differ before it summarizes the rest (--all prints them all).
LISTED_DIFFERENCES = 50


@dataclasses.dataclass
class KeyDiff:
    key: str
    status: str  # equal, different, dtype, shape, type, only_a, only_b
    max_abs: float | None = None
    max_rel: float | None = None
    dtype_a: str | None = None
    dtype_b: str | None = None
    shape_a: list[int] | None = None
    shape_b: list[int] | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def compare_tensors(a, b) -> tuple[float, float]:
    """(max |a - b|, that divided by max |a|), in float64 for integers and float64 inputs, else float32.

    Elements equal on both sides (including matching infinities and NaNs at the same places)
    count as 0; a NaN on one side only makes both results NaN.
    """
    import torch

    wide = torch.float64 if torch.float64 in (a.dtype, b.dtype) or not (
        a.dtype.is_floating_point and b.dtype.is_floating_point) else torch.float32
    x, y = a.detach().to(wide), b.detach().to(wide)
    if x.numel() == 0:
        return 0.0, 0.0
    same = (x == y) | (x.isnan() & y.isnan())
    delta = torch.where(same, torch.zeros((), dtype=wide), (x - y).abs())
    max_abs = float("nan") if delta.isnan().any() else delta.max().item()
    scale = x.abs().nan_to_num(nan=0.0, posinf=0.0, neginf=0.0).max().item()
    if max_abs == 0.0:
        return 0.0, 0.0
    return max_abs, (max_abs / scale if scale > 0 else float("inf"))


def same_value(x: Any, y: Any) -> bool:
    """Equality of non-tensor checkpoint values (nested dicts/lists, possibly holding tensors)."""
    import torch

    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                and x.dtype == y.dtype and compare_tensors(x, y)[0] == 0.0)
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(same_value(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(same_value(p, q) for p, q in zip(x, y))
    try:
        return bool(x == y)
    except Exception:
        return False


def _as_comparable(ckpt, other, model_name: str):
    """An HF directory compared with a DCP step or .pt is read under cairn's names."""
    if ckpt.format == "hf" and other.format != "hf":
        if ckpt.config is None:
            raise UsageError("cannot map Hugging Face names to cairn names without a config.json", ckpt.path)
        return HfAsFqns(ckpt, model_name)
    return ckpt


def diff_checkpoints(a, b, *, atol: float, groups: list[str] | None = None,
                     advance: Callable[[int], None] = lambda n: None) -> list[KeyDiff]:
    """One KeyDiff per key of either side (in a's order, then b's extra keys)."""
    entries_a, entries_b = a.entries(), b.entries()
    if groups:
        entries_a = {k: e for k, e in entries_a.items() if e.group in groups}
        entries_b = {k: e for k, e in entries_b.items() if e.group in groups}
    results: dict[str, KeyDiff] = {}
    tensors, values = [], []
    for key, ea in entries_a.items():
        eb = entries_b.get(key)
        if eb is None:
            results[key] = KeyDiff(key, "only_a")
        elif ea.is_tensor != eb.is_tensor:
            results[key] = KeyDiff(key, "type")
        elif not ea.is_tensor:
            values.append(key)
        elif ea.shape != eb.shape:
            results[key] = KeyDiff(key, "shape", shape_a=list(ea.shape), shape_b=list(eb.shape))
        else:
            tensors.append(key)
    for key in entries_b:
        if key not in entries_a:
            results[key] = KeyDiff(key, "only_b")
    for batch in read_batches(tensors, entries_a):
        read_a, read_b = a.read(batch), b.read(batch)
        for key in batch:
            max_abs, max_rel = compare_tensors(read_a[key], read_b[key])
            dtype_a, dtype_b = (str(t.dtype).removeprefix("torch.") for t in (read_a[key], read_b[key]))
            status = "equal" if max_abs <= atol else "different"  # NaN compares false: different
            if dtype_a != dtype_b and status == "equal":
                status = "dtype"
            results[key] = KeyDiff(key, status, max_abs, max_rel, dtype_a, dtype_b)
            advance(entries_a[key].num_bytes)
        del read_a, read_b
    if values:
        read_a, read_b = a.read(values), b.read(values)
        for key in values:
            results[key] = KeyDiff(key, "equal" if same_value(read_a[key], read_b[key]) else "different")
    order = list(entries_a) + [k for k in entries_b if k not in entries_a]
    return [results[key] for key in order]


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if math.isnan(value) or math.isinf(value):
        return str(value)
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"


def _diff_note(d: KeyDiff) -> str:
    if d.status == "shape":
        return f"shape {shape_text(d.shape_a)} -> {shape_text(d.shape_b)}"
    if d.status == "type":
        return "tensor vs value"
    if d.dtype_a and d.dtype_b and d.dtype_a != d.dtype_b:
        return f"dtype {short_dtype(d.dtype_a)} -> {short_dtype(d.dtype_b)}"
    if d.status == "different" and d.max_abs is None:
        return "value differs"
    return ""


def _by_group(keys: list[str]) -> str:
    counts: dict[str, int] = {}
    for key in keys:
        counts[group_of(key)] = counts.get(group_of(key), 0) + 1
    return ", ".join(f"{group} {n}" for group, n in counts.items())


def format_diff(a, b, diffs: list[KeyDiff], atol: float, style: Style, list_all: bool) -> list[str]:
    lines = []
    for label, ckpt in (("a", a), ("b", b)):
        lines.append(f"{label}: {elide(display_path(ckpt.path), WIDTH - 6 - len(ckpt.format))} ({ckpt.format})")
    columns = [Column("KEY", 0), Column("MAX ABS", 9, right=True), Column("MAX REL", 9, right=True),
               Column("NOTE", 20)]
    columns[0].width = WIDTH - sum(c.width + 1 for c in columns[1:])
    shown = [d for d in diffs if d.status not in ("only_a", "only_b") and (list_all or d.status != "equal")]
    hidden = 0
    if not list_all and len(shown) > LISTED_DIFFERENCES:
        shown, hidden = shown[:LISTED_DIFFERENCES], len(shown) - LISTED_DIFFERENCES
    if shown:
        lines.append(style.dim(table_line(columns, [c.header for c in columns])))
    for d in shown:
        cells = [_number(d.max_abs), _number(d.max_rel), _diff_note(d)]
        colour = None if d.status == "equal" else style.yellow if d.status == "dtype" else style.red
        if len(d.key) > columns[0].width:
            lines.append(elide(d.key, WIDTH))
            lines.append(table_line(columns, [""] + cells, [None, colour, None, None]))
        else:
            lines.append(table_line(columns, [d.key] + cells, [None, colour, None, None]))
    if hidden:
        lines.append(style.dim(f"... and {hidden} more (--all lists every key, --json gives the numbers)"))
    for side, status in (("a", "only_a"), ("b", "only_b")):
        keys = [d.key for d in diffs if d.status == status]
        if keys:
            lines += wrapped(f"only in {side}: {len(keys)} key(s) ({_by_group(keys)})", indent="")
            if list_all:
                lines += [f"  {elide(key, WIDTH - 2)}" for key in keys]
    compared = [d for d in diffs if d.status not in ("only_a", "only_b")]
    counts = {status: sum(1 for d in diffs if d.status == status)
              for status in ("different", "dtype", "shape", "type", "only_a", "only_b")}
    equal = not any(counts.values())
    parts = [f"{len(compared) - sum(counts[s] for s in ('different', 'dtype', 'shape', 'type'))} of "
             f"{len(compared)} compared keys equal (atol {atol:g})"]
    parts += [f"{counts[s]} {label}" for s, label in (("different", "differ"), ("dtype", "dtype change(s)"),
                                                      ("shape", "shape change(s)"), ("type", "type change(s)"),
                                                      ("only_a", "only in a"), ("only_b", "only in b")) if counts[s]]
    verdict = style.green("EQUAL") if equal else style.red("DIFFERENT")
    lines += wrapped(f"{verdict}: " + ", ".join(parts), indent="")
    return lines


def cmd_diff(args: argparse.Namespace) -> int:
    if args.atol < 0:
        raise UsageError(f"--atol must be >= 0 (got {args.atol})")
    groups = _split_groups(args.only, Path(args.a))
    a, b = open_checkpoint(Path(args.a)), open_checkpoint(Path(args.b))
    a, b = _as_comparable(a, b, args.model_name), _as_comparable(b, a, args.model_name)
    total = sum(e.num_bytes for e in a.entries().values() if e.is_tensor and (not groups or e.group in groups))
    with _progress_bar(total, "diff", show_progress(args)) as advance:
        diffs = diff_checkpoints(a, b, atol=args.atol, groups=groups, advance=advance)
    equal = all(d.status == "equal" for d in diffs)
    if args.json:
        print(json.dumps({"a": str(a.path), "b": str(b.path), "atol": args.atol, "equal": equal,
                          "keys": [d.to_json() for d in diffs]}, indent=1))
    else:
        print("\n".join(format_diff(a, b, diffs, args.atol, Style(use_color(args.color)), args.all)))
    return EXIT_OK if equal else EXIT_FAILED


def _split_groups(values: list[str] | None, path: Path) -> list[str] | None:
    if not values:
        return None
    groups = [g.strip() for value in values for g in value.split(",") if g.strip()]
    groups = ["dataloader" if g == "data_loader" else g for g in groups]
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise UsageError(f"--only {unknown[0]}: choose from {', '.join(GROUPS)}", path)
    return groups


# --- convert -------------------------------------------------------------------------------------


def torch_file_to_dcp(src: Path, dst: Path, *, export_dtype: Any = None, progress: bool = False) -> dict:
    """A ``torch.save`` state dict (memory-mapped) as a DCP checkpoint, one tensor read at a time."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._nested_dict import flatten_state_dict
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.planner import WriteItemType

    from cairn.checkpoint.convert import _cast_dtype
    from cairn.checkpoint.hf import staged_output

    start = time.perf_counter()
    ckpt = TorchCheckpoint(src)
    if not isinstance(ckpt.obj, dict) or not ckpt.obj:
        raise UsageError(f"holds a {type(ckpt.obj).__name__}, not a state dict", src)
    flat, _ = flatten_state_dict(ckpt.obj)
    total = sum(t.numel() * t.element_size() for t in flat.values() if isinstance(t, torch.Tensor))

    def shapes_only(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.empty(value.shape, dtype=_cast_dtype(value.dtype, export_dtype), device="meta")
        if isinstance(value, dict):
            return {k: shapes_only(v) for k, v in value.items()}
        if isinstance(value, list):
            return [shapes_only(v) for v in value]
        return value

    class StreamingPlanner(DefaultSavePlanner):
        """Plans from meta tensors; reads each tensor from the mapped file only when it is written."""

        def resolve_data(self, write_item):
            if write_item.type == WriteItemType.BYTE_IO:
                return super().resolve_data(write_item)
            tensor = flat[write_item.index.fqn].to(write_item.tensor_data.properties.dtype)
            advance(tensor.numel() * tensor.element_size())
            return tensor

    with staged_output(dst) as staging, _progress_bar(total, "torch -> DCP", progress) as advance:
        with _quiet_dcp():
            dcp.save(shapes_only(ckpt.obj), storage_writer=FileSystemWriter(staging, thread_count=1),
                     planner=StreamingPlanner(), no_dist=True)
    num_tensors = sum(1 for t in flat.values() if isinstance(t, torch.Tensor))
    return {"tensors": num_tensors, "values": len(flat) - num_tensors, "bytes": total,
            "seconds": time.perf_counter() - start}


@dataclasses.dataclass
class ConvertOptions:
    model_name: str
    flavor: str | None
    export_dtype: str | None
    hf_assets_path: str | None
    max_shard_bytes: int
    progress: bool


def _defaults_from_manifest(src: Path, options: ConvertOptions) -> ConvertOptions:
    """Model name, flavor, tokenizer folder and dtype of a cairn step, where the user gave none."""
    from cairn.data.paths import resolve_path

    manifest, _ = read_manifest_quietly(src)
    if not manifest:
        return options
    model = manifest.get("model") or {}
    config_model = (manifest.get("config") or {}).get("model") or {}
    assets = options.hf_assets_path or config_model.get("hf_assets_path")
    if assets is None and config_model.get("tokenizer_path"):
        tokenizer = resolve_path(config_model["tokenizer_path"])
        assets = str(tokenizer.parent) if tokenizer is not None else None
    dtype = options.export_dtype
    if dtype is None and manifest.get("dtype") in ("float32", "bfloat16", "float16"):
        dtype = manifest["dtype"]
    return dataclasses.replace(options, flavor=options.flavor or model.get("flavor"), hf_assets_path=assets,
                               export_dtype=dtype)


def convert_checkpoint(src: Path, dst: Path, to: str, options: ConvertOptions) -> dict:
    """Any of DCP / HF / .pt to any other; HF <-> .pt goes through a temporary DCP beside ``dst``."""
    from cairn.checkpoint.convert import convert_dcp_to_hf, convert_hf_to_dcp, dcp_to_torch_file

    source = detect_format(src)
    if source == to:
        raise UsageError(f"already a {to} checkpoint; nothing to convert", src)
    if dst.exists() and (dst.is_file() or any(dst.iterdir())):
        raise UsageError("already exists; choose a new path (nothing is ever overwritten)", dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dtype = options.export_dtype
    if source == "dcp":
        options = _defaults_from_manifest(src, options)
    if source == "dcp" and to == "hf":
        return convert_dcp_to_hf(src, dst, model_name=options.model_name, flavor=options.flavor,
                                 hf_assets_path=options.hf_assets_path,
                                 export_dtype=options.export_dtype or "float32",
                                 max_shard_bytes=options.max_shard_bytes, progress=options.progress)
    if source == "hf" and to == "dcp":
        return convert_hf_to_dcp(src, dst, model_name=options.model_name, flavor=options.flavor, dtype=dtype,
                                 progress=options.progress)
    if source == "dcp" and to == "torch":
        return dcp_to_torch_file(src, dst, export_dtype=_torch_dtype(dtype), progress=options.progress)
    if source == "torch" and to == "dcp":
        return torch_file_to_dcp(src, dst, export_dtype=_torch_dtype(dtype), progress=options.progress)
    with _temporary_dir(dst) as middle:  # hf -> torch, torch -> hf
        first = dataclasses.replace(options, export_dtype=None)
        convert_checkpoint(src, middle / "dcp", "dcp", first)
        return convert_checkpoint(middle / "dcp", dst, to, options)


@contextlib.contextmanager
def _temporary_dir(beside: Path) -> Iterator[Path]:
    path = beside.parent / f".{beside.name}.convert-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _torch_dtype(name: str | None):
    if name is None:
        return None
    from cairn.checkpoint.hf import resolve_dtype

    return resolve_dtype(name)


def cmd_convert(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    options = ConvertOptions(model_name=args.model_name, flavor=args.model_flavor, export_dtype=args.export_dtype,
                             hf_assets_path=args.hf_assets_path, max_shard_bytes=args.max_shard_bytes,
                             progress=show_progress(args))
    if args.hf_assets_path and not Path(args.hf_assets_path).is_dir():
        raise UsageError("--hf_assets_path: no such directory", args.hf_assets_path)
    start = time.perf_counter()
    stats = convert_checkpoint(src, dst, args.to, options)
    what = f"{stats['tensors']} tensors" + (f" and {stats['values']} other values" if stats.get("values") else "")
    print(f"wrote {display_path(dst)} ({args.to}): {what}, {human_bytes(stats.get('bytes'))} in "
          f"{time.perf_counter() - start:.1f} s")
    return EXIT_OK


# --- plot ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    label: str
    points: dict[int, float]  # step -> value (a step re-run after a resume: the later value)
    saves: list[tuple[int, str]]  # (step, kind)
    resumes: list[int]  # steps a run resumed from


def load_run(path: Path, metric: str) -> Run:
    """A run's ``metric`` per step, its checkpoint saves and resumes, from its metrics.jsonl."""
    file = path if path.is_file() else path / "metrics.jsonl"
    if not path.exists():
        raise UsageError("no such run directory", path)
    if not file.is_file():
        raise UsageError("no metrics.jsonl here (a run's --job.dump_folder holds one)", path)
    points: dict[int, float] = {}
    saves, resumes = [], []
    last_step = None
    for number, line in enumerate(file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise UsageError(f"line {number} of metrics.jsonl is not JSON", file) from None
        event, step = record.get("event"), record.get("step")
        if not isinstance(step, int):
            continue
        if event == "checkpoint_save":
            saves.append((step, str(record.get("kind", "full"))))
        elif event == "checkpoint_load" and record.get("kind") == "full":  # a resume, not a fresh start
            resumes.append(step)
        elif event is None and isinstance(record.get(metric), (int, float)):
            if last_step is not None and step <= last_step and resumes[-1:] != [step - 1]:
                resumes.append(step - 1)  # re-run steps: a resume from a checkpoint older than the crash
            points[step] = float(record[metric])
            last_step = step
    if not points:
        raise UsageError(f"no {metric!r} values in metrics.jsonl", file)
    return Run(str(path), points, saves, sorted(set(resumes)))


def _labels(paths: list[Path]) -> list[str]:
    """Run dir names; more of the path where two runs share a name."""
    for depth in range(1, 6):
        labels = ["/".join(p.resolve().parts[-depth:]) if p.is_dir() else
                  "/".join(p.resolve().parent.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def plot_runs(runs: list[Run], out: Path, metric: str, title: str | None = None) -> None:
    try:
        import matplotlib
    except ImportError:
        raise UsageError("needs matplotlib: pip install matplotlib (or pip install -e '.[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    line_styles = ["-", "--", "-.", ":"]
    markers = {"full": "o", "model_only": "s", "hf": "D", "seed": "^"}
    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    try:
        for i, run in enumerate(runs):
            steps = sorted(run.points)
            (line,) = ax.plot(steps, [run.points[s] for s in steps], line_styles[i % len(line_styles)],
                              linewidth=2.2 if i == 0 else 1.4, alpha=0.9, label=run.label)
            color = line.get_color()
            for kind in sorted({kind for _, kind in run.saves}):
                marked = [s for s, k in run.saves if k == kind and s in run.points]
                ax.plot(marked, [run.points[s] for s in marked], linestyle="none", marker=markers.get(kind, "o"),
                        markersize=7, markerfacecolor="none", markeredgecolor=color, markeredgewidth=1.5)
            for step, _ in run.saves:  # ticks along the bottom: every save, also those off the curve
                ax.axvline(step, ymin=0, ymax=0.035, color=color, linewidth=1.5)
            for step in run.resumes:
                ax.axvline(step, color=color, linestyle=":", linewidth=1.2, alpha=0.8)
        handles, _ = ax.get_legend_handles_labels()
        kinds = sorted({kind for run in runs for _, kind in run.saves})
        handles += [Line2D([], [], linestyle="none", marker=markers.get(kind, "o"), markerfacecolor="none",
                           markeredgecolor="0.3", label=f"{KIND_NAMES.get(kind, kind)} checkpoint saved")
                    for kind in kinds]
        if any(run.resumes for run in runs):
            handles.append(Line2D([], [], color="0.3", linestyle=":", label="resumed from a checkpoint"))
        ax.legend(handles=handles, fontsize=8, loc="best")
        ax.set_xlabel("step")
        ax.set_ylabel(metric)
        ax.set_title(title or f"{metric} per step")
        ax.grid(alpha=0.25)
        fig.tight_layout()
        fig.savefig(out)
    finally:
        plt.close(fig)


def cmd_plot(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.run_dirs]
    runs = [load_run(path, args.metric) for path in paths]
    for run, label in zip(runs, _labels(paths)):
        run.label = label
    out = Path(args.output)
    if not out.parent.exists():
        raise UsageError("the output's folder does not exist", out)
    plot_runs(runs, out, args.metric, args.title)
    saves = sum(len(run.saves) for run in runs)
    print(f"wrote {display_path(out)}: {len(runs)} run(s), {sum(len(r.points) for r in runs)} points, "
          f"{saves} checkpoint save(s) marked")
    return EXIT_OK


# --- the command line --------------------------------------------------------------------------------

_EXAMPLES = {
    "ls": """examples:
  cairn checkpoint ls outputs/checkpoint
  cairn checkpoint ls outputs --checksums        # a run's dump folder works too
  cairn checkpoint ls outputs/checkpoint --json | jq '.steps[0]'
""",
    "inspect": """examples:
  cairn checkpoint inspect outputs/checkpoint/step-500
  cairn checkpoint inspect outputs/checkpoint/step-500 --group rng --values
  cairn checkpoint inspect hf_dir        # safetensors: headers only
  cairn checkpoint inspect model.pt --json
""",
    "verify": """exit status: 0 every file is sound, 1 something is corrupt, 2 usage error.

examples:
  cairn checkpoint verify outputs/checkpoint/step-500
  cairn checkpoint verify outputs/checkpoint          # every committed step
  cairn checkpoint verify outputs/checkpoint --quick  # sizes only
""",
    "diff": """exit status: 0 equal (every max abs difference <= --atol, same keys, dtypes
and shapes), 1 different, 2 usage error. MAX REL is max|a-b| / max|a|.

examples:
  cairn checkpoint diff run1/checkpoint/step-20 run2/checkpoint/step-20
  cairn checkpoint diff a/step-20 b/step-20 --only model --atol 1e-6
  cairn checkpoint diff outputs/checkpoint/step-10 hf_dir  # HF as cairn names
""",
    "convert": """formats: dcp (a step folder, any saving layout), hf (safetensors + config.json,
loadable by transformers), torch (one torch.save file, as
`python -m torch.distributed.checkpoint.format_utils dcp_to_torch` writes it).
The destination must not exist (or be an empty folder); it appears only once the
conversion is complete. For a cairn step, --model_flavor, the tokenizer files
and the dtype default to what its manifest records.

examples:
  cairn checkpoint convert outputs/checkpoint/step-1000 model.pt --to torch
  cairn checkpoint convert outputs/checkpoint/step-1000 hf_out --to hf \\
      --export_dtype bfloat16 --hf_assets_path ./assets/hf/Llama3.1-8B
  cairn checkpoint convert ./Meta-Llama-3-8B ./initial_load_path --to dcp
""",
    "plot": """examples:
  cairn checkpoint plot outputs/whole outputs/resumed -o loss.png
  cairn checkpoint plot outputs/run1 --metric grad_norm -o grad_norm.png
""",
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=30, width=WIDTH)


def _common(json_output: bool = True) -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    if json_output:
        common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                        help="colours: auto (a terminal without NO_COLOR), always, never")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    common.add_argument("-v", "--verbose", action="store_true", help="log messages, and a traceback on errors")
    return common


def add_checkpoint_parser(commands) -> None:
    """``checkpoint`` and its subcommands, on the ``cairn`` parser's subcommand action."""
    checkpoint = commands.add_parser(
        "checkpoint", aliases=["ckpt"], formatter_class=_Formatter, help="list, inspect, verify, diff, convert, plot",
        description="Look at, check, compare and convert training checkpoints (DCP step folders,\n"
                    "Hugging Face directories, single .pt files). No command runs code from a\n"
                    "checkpoint file.")
    checkpoint.set_defaults(run=None, help_parser=checkpoint)
    sub = checkpoint.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")

    def add(name: str, run: Callable[[argparse.Namespace], int], short: str, summary: str,
            json_output: bool = True):
        parser = sub.add_parser(name, help=short, description=summary, epilog=_EXAMPLES[name],
                                formatter_class=_Formatter, parents=[_common(json_output)])
        parser.set_defaults(run=_guarded(name, run))
        return parser

    ls = add("ls", cmd_ls, "the steps of a checkpoint folder, newest first",
             "One row per step in a checkpoint folder, newest first: kind, committed or not,\n"
             "verified, dtype, size, files, saving layout, time.")
    ls.add_argument("folder", help="checkpoint folder (or a run's dump folder)")
    ls.add_argument("--checksums", action="store_true", help="hash every file (default: sizes only)")

    inspect = add("inspect", cmd_inspect, "keys, shapes, dtypes, bytes and files of a checkpoint",
                  "What a checkpoint holds: keys by group (model, optimizer, lr_scheduler,\n"
                  "dataloader, train_state, rng), shapes, dtypes, bytes, files.")
    inspect.add_argument("step_dir", help="a step folder, a Hugging Face directory or a .pt file")
    inspect.add_argument("--group", action="append", metavar="GROUP", help=f"only these groups ({', '.join(GROUPS)})")
    inspect.add_argument("--all", action="store_true", help="list every non-tensor value too")
    inspect.add_argument("--values", action="store_true", help="read and show non-tensor values (steps, seeds, ...)")

    verify = add("verify", cmd_verify, "check every file against its checksum; exit 1 if corrupt",
                 "Check every file of a step (or of every step in a folder) against the\n"
                 "checksums in its manifest.")
    verify.add_argument("path", help="a step folder, a checkpoint folder, an HF directory or a .pt file")
    verify.add_argument("--quick", action="store_true", help="sizes and structure only, no checksums")

    diff = add("diff", cmd_diff, "per-tensor differences of two checkpoints; exit 1 if any",
               "Per-tensor max absolute and relative differences between two checkpoints,\n"
               "keys only in one of them, dtype and shape changes.")
    diff.add_argument("a", help="checkpoint a (step folder, HF directory or .pt)")
    diff.add_argument("b", help="checkpoint b")
    diff.add_argument("--atol", type=float, default=0.0, help="largest difference counted as equal (default 0)")
    diff.add_argument("--only", action="append", metavar="GROUP", help="compare only these groups, e.g. model")
    diff.add_argument("--all", action="store_true", help="list equal tensors and every one-sided key too")
    diff.add_argument("--model_name", default="llama3", help="model family, to read HF names (default llama3)")

    convert = add("convert", cmd_convert, "DCP <-> Hugging Face <-> single .pt, streaming",
                  "Convert between DCP, Hugging Face safetensors and a single .pt file,\n"
                  "streaming tensor by tensor.", json_output=False)
    convert.add_argument("src", help="a step folder, a Hugging Face directory or a .pt file")
    convert.add_argument("dst", help="output path (must not exist yet)")
    convert.add_argument("--to", required=True, choices=FORMATS, help="output format")
    convert.add_argument("--model_name", default="llama3", help="model family (default llama3)")
    convert.add_argument("--model_flavor", default=None, help="model size, e.g. 8B (default: manifest/config.json)")
    convert.add_argument("--export_dtype", default=None, choices=("float32", "bfloat16", "float16"),
                         help="dtype of floating tensors (default: the source's; HF: float32)")
    convert.add_argument("--hf_assets_path", default=None,
                         help="tokenizer files (and config.json) to ship with an HF export")
    convert.add_argument("--max_shard_bytes", type=int, default=5_000_000_000,
                         help="largest safetensors file (default 5 GB)")

    plot = add("plot", cmd_plot, "loss curves of runs, checkpoint saves marked",
               "Loss curves of runs from their metrics.jsonl, checkpoint saves marked.",
               json_output=False)
    plot.add_argument("run_dirs", nargs="+", metavar="run_dir", help="a run's dump folder (or its metrics.jsonl)")
    plot.add_argument("-o", "--output", default="loss.png", help="image file (.png, .svg, .pdf; default loss.png)")
    plot.add_argument("--metric", default="loss", help="what to plot: loss, grad_norm, lr, ... (default loss)")
    plot.add_argument("--title", default=None, help="plot title")


def _guarded(name: str, run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Runs a subcommand; user errors become one line on stderr and an exit status, never a traceback."""

    def guarded(args: argparse.Namespace) -> int:
        prefix = f"cairn checkpoint {name}"
        cairn_logger = logging.getLogger("cairn")
        saved_level = cairn_logger.level
        cairn_logger.setLevel(logging.INFO if args.verbose else logging.ERROR)
        handler = logging.StreamHandler(sys.stderr) if args.verbose else None
        if handler is not None:
            cairn_logger.addHandler(handler)
        try:
            with _quiet_dcp():
                return run(args)
        except UsageError as e:
            return _fail(prefix, e.what, e.path, [], EXIT_USAGE)
        except CheckFailed as e:
            return _fail(prefix, e.what, e.path, _details(e.__cause__) if e.__cause__ else [], EXIT_FAILED)
        except KeyboardInterrupt:
            return _fail(prefix, "interrupted", None, [], 130)
        except BrokenPipeError:  # `cairn checkpoint inspect ... | head`
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        except Exception as e:
            storage = sys.modules.get("cairn.checkpoint.storage")
            if args.verbose or storage is None or not isinstance(e, (storage.CheckpointError, OSError, ValueError)):
                raise  # a bug (or --verbose): the traceback is what a report needs
            bad_data = isinstance(e, (storage.CorruptCheckpointError, storage.UnsafeCheckpointError))
            return _fail(prefix, _first_line(e), None, _details(e), EXIT_FAILED if bad_data else EXIT_USAGE)
        finally:
            cairn_logger.setLevel(saved_level)
            if handler is not None:
                cairn_logger.removeHandler(handler)

    return guarded


def _fail(prefix: str, what: str, path: Any, details: list[str], status: int) -> int:
    where = f" ({path})" if path is not None and str(path) not in what else ""
    sys.stdout.flush()
    print(f"{prefix}: {what}{where}", file=sys.stderr)
    for line in details:
        indent = " " * (len(line) - len(line.lstrip()))
        for part in wrapped(line.strip(), indent=indent):
            print(part, file=sys.stderr)
    return status
