"""``cairn checkpoint ls|inspect|verify|diff|convert``: what each subcommand does and prints.

Every command reads DCP step folders, Hugging Face directories and single ``.pt`` files
alike (``readers.py``), and none runs code from a checkpoint. Exit status: 0 fine, 1 the
checkpoint is corrupt or unsafe (``diff``: different), 2 a usage error.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from cairn.checkpoint.cli.output import (
    EXIT_FAILED,
    EXIT_OK,
    KIND_NAMES,
    WIDTH,
    Column,
    Style,
    elide,
    human_bytes,
    iso_time,
    layout_text,
    local_time,
    plural,
    shape_text,
    short_dtype,
    show_progress,
    table_line,
    use_color,
    wrapped,
)
from cairn.checkpoint.cli.folder import clean_hint, lease_json, lease_lines, open_folder, resolve_folder
from cairn.checkpoint.convert import ConvertOptions, convert_checkpoint
from cairn.checkpoint.errors import CheckFailed, CheckpointError, UsageError, first_line
from cairn.checkpoint.dcp_metadata import grouped_record, index_ranges
from cairn.checkpoint.fsio import display_path, is_hf_dir, tree_usage
from cairn.checkpoint.groups import describe
from cairn.checkpoint.hf import HFWeights
from cairn.checkpoint.layout import Leftover, step_name, step_of
from cairn.checkpoint.lease import lease_state
from cairn.checkpoint.local import LocalStore
from cairn.checkpoint.memory_slots import list_snapshots
from cairn.checkpoint.store import is_object_uri, local_folder, open_step, open_store, upload_local
from cairn.checkpoint.readers import (
    GROUPS,
    DcpCheckpoint,
    Entry,
    HfAsFqns,
    TorchCheckpoint,
    detect_format,
    file_order,
    group_of,
    open_checkpoint,
    progress_bar,
    read_batches,
    read_manifest_quietly,
)


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
    num_bytes: int | None = 0
    num_files: int | None = 0
    layout: dict | None = None
    model: dict | None = None
    created: float | None = None
    leftover: str | None = None  # why an uncommitted dir or object is there
    removable: bool = True  # a leftover ``clean`` removes (else: not cairn's)

    def to_json(self) -> dict:
        return {"step": self.step, "name": self.name, "path": str(self.path), "committed": self.committed,
                "kind": self.kind, "storage": self.storage, "status": self.status, "checked": self.checked,
                "problems": self.problems, "dtype": self.dtype, "bytes": self.num_bytes, "files": self.num_files,
                "layout": self.layout, "model": self.model, "created": iso_time(self.created),
                "leftover": self.leftover, **({} if self.committed else {"removable": self.removable})}

    @property
    def status(self) -> str:
        if not self.committed:
            return "uncommitted"
        return "corrupt" if self.problems else "ok"


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
    path = storage.step_dir(step)
    manifest, problems = read_manifest_quietly(path)
    row = StepRow(path.name, path, step, True)
    row.num_bytes, row.num_files = tree_usage(path)
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


def leftover_row(leftover: Leftover, folder: str) -> StepRow:
    """A row of ``ls`` for something a crash left (``store.leftovers()``)."""
    location = leftover.location
    name = location.removeprefix(folder.rstrip("/") + "/") if location.startswith(folder) else Path(location).name
    return StepRow(name, location, -1 if leftover.step is None else leftover.step, False, num_bytes=leftover.num_bytes,
                   num_files=leftover.num_files, created=leftover.created, leftover=leftover.why,
                   removable=leftover.removable)


def list_steps(folder: Path, checksums: bool = False, show_bar: bool = False) -> list[StepRow]:
    """Every committed step in a local checkpoint folder."""
    storage = LocalStore(folder)
    steps = storage.committed_steps()
    rows = []
    total = 0
    if checksums:
        for step in steps:
            manifest, _ = read_manifest_quietly(storage.step_dir(step))
            total += int((manifest or {}).get("total_bytes") or 0)
    with progress_bar(total, "checksums", show_bar and checksums) as advance:
        for step in steps:
            rows.append(_committed_row(storage, step, checksums, advance))
    return rows


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


def _table_top(title: str, folder: Path, columns: list[Column], style: Style, rows: list, empty: str) -> list[str]:
    """A listing's first lines: the title naming ``folder`` (elided to the width), then the
    column headers, or ``empty`` in their place when there are no rows."""
    lines = [style.bold(f"{title} {elide(display_path(folder), WIDTH - len(title) - 1)}")]
    return lines + ([style.dim(table_line(columns, [c.header for c in columns]))] if rows else [f"  {empty}"])


def format_ls(folder: str, rows: list[StepRow], style: Style, lease: dict | None = None,
              stored: str = "on disk") -> list[str]:
    lines = _table_top("checkpoint folder", folder, LS_COLUMNS, style, rows, "no checkpoints yet")
    for row in rows:
        verify, verify_style = _verify_cell(row, style)
        dtypes = ",".join(short_dtype(d) for d in row.dtype.split(",")) if row.dtype else "-"
        step = "-" if row.step < 0 else str(row.step)
        cells = [step + ("" if row.committed else "*"), _kind_text(row), "yes" if row.committed else "no",
                 verify, dtypes, human_bytes(row.num_bytes), "-" if row.num_files is None else str(row.num_files),
                 layout_text(row.layout), local_time(row.created)]
        styles = [None, None, None if row.committed else style.yellow, verify_style] + [None] * 5
        lines.append(table_line(LS_COLUMNS, cells, styles))
    committed = [row for row in rows if row.committed]
    corrupt = [row for row in committed if row.problems]
    if rows:
        lines.append(f"{plural(len(committed), 'committed step')}, {human_bytes(sum(r.num_bytes or 0 for r in rows))} "
                     f"{stored}" + (f"; {len(corrupt)} corrupt" if corrupt else ""))
    lines += lease_lines(lease, folder, style)
    leftovers = [row for row in rows if not row.committed]
    for row in leftovers:
        step = "-" if row.step < 0 else str(row.step)
        left = "never loaded" if row.removable else "never loaded nor removed; delete it by hand if unwanted"
        lines += wrapped(f"{step}*: {row.name}: {row.leftover} ({left})", indent="")
    lines += clean_hint(folder, lease, sum(row.removable for row in leftovers))
    for row in corrupt:
        lines += wrapped(f"step {row.step}: {relative_to_step(row.problems[0], row.path)}", indent="")
    checks = {row.checked for row in committed}
    if "sizes" in checks or "structure" in checks:
        lines += wrapped("sizes ok: every file has the size its manifest records; `--checksums` or `cairn "
                         "checkpoint verify` hashes every byte.", indent="")
    return lines


def _remote_rows(store, checksums: bool) -> list[StepRow]:
    """The committed steps of an object-store folder."""
    rows = []
    for step in store.committed_steps():
        row = StepRow(step_name(step), store.step_url(step), step, True)
        try:
            manifest = store.read_manifest(step)
        except CheckpointError as e:
            manifest, row.problems = None, list(getattr(e, "problems", None) or [str(e)])
        if manifest is not None:
            row.problems = store.verify(step, checksums=checksums)
            row.kind, row.storage = manifest.get("kind"), manifest.get("storage")
            row.layout, row.model, row.created = manifest.get("layout"), manifest.get("model"), manifest.get("created_unix")
            row.num_bytes, row.num_files = int(manifest.get("total_bytes") or 0), len(manifest.get("files") or {})
            row.checked = "checksums" if checksums and manifest.get("checksum_algorithm") else "sizes"
            row.dtype = _model_dtype(manifest, Path("."))
        rows.append(row)
    return rows


MEMORY_COLUMNS = [Column("step", 8), Column("holder", 14), Column("slot", 6), Column("state", 10),
                  Column("size", 9, right=True), Column("layout", 20), Column("taken", 16)]


def format_memory_ls(folder: Path, rows: list[dict], style: Style) -> list[str]:
    lines = _table_top("memory snapshots in", folder, MEMORY_COLUMNS, style, rows, "none")
    if not rows:
        return lines
    for row in rows:
        problems = row.get("problems")
        state = "unusable" if row.get("unusable") else "torn" if not row["committed"] else (
            "corrupt" if problems else "ok" if problems is not None else "committed")
        state_style = style.red if problems or row.get("unusable") else (style.yellow if not row["committed"] else None)
        cells = [str(row["step"]) if row["step"] is not None else "-", row["holder"], row["slot"], state,
                 human_bytes(row["bytes"]), layout_text(row["layout"]), local_time(row["created_unix"])]
        lines.append(table_line(MEMORY_COLUMNS, cells, [None, None, None, state_style, None, None, None]))
    trained = {row["rank"]: row["trained_to"] for row in rows if row.get("trained_to") is not None}
    if trained:
        lines.append("trained to: " + ", ".join(f"rank {rank} step {step}" for rank, step in sorted(trained.items())))
    for row in rows:
        if row.get("unusable"):
            lines += wrapped(f"unusable: {row['unusable']}".replace(f"{folder}{os.sep}", ""), indent="")
        for problem in row.get("problems") or []:
            lines += wrapped(problem.replace(f"{folder}{os.sep}", ""), indent="")  # relative to the folder
    lines += wrapped("torn: a snapshot cut short (never loaded); unusable: a record that cannot be a snapshot's "
                     "(never loaded); replica-of-<r>: rank r's snapshot kept on this node. A run restores the newest "
                     "step every rank has whole, of its own run.", indent="")
    return lines


def cmd_ls(args: argparse.Namespace) -> int:
    if args.memory:
        folder = Path(args.folder)
        if not folder.is_dir():
            raise UsageError("no such folder (a node's --checkpoint.memory_dir)", args.folder)
        rows = list_snapshots(folder, checksums=args.checksums)
        if args.json:
            print(json.dumps({"folder": str(folder), "snapshots": rows}, indent=1))
        else:
            print("\n".join(format_memory_ls(folder, rows, Style(use_color(args.color)))))
        return EXIT_OK
    store, folder = open_folder(args.folder)
    if is_object_uri(args.folder):
        rows = _remote_rows(store, args.checksums)
    else:
        rows = list_steps(Path(store.url), checksums=args.checksums, show_bar=show_progress(args))
    rows += [leftover_row(leftover, store.url) for leftover in store.leftovers()]
    rows.sort(key=lambda row: (row.step, row.committed, row.name), reverse=True)
    lease = lease_state(store)
    if args.json:
        print(json.dumps({"folder": str(folder), "steps": [row.to_json() for row in rows],
                          "lease": lease_json(lease)}, indent=1))
    else:
        print("\n".join(format_ls(folder, rows, Style(use_color(args.color)), lease,
                                  "stored" if is_object_uri(args.folder) else "on disk")))
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
    if isinstance(ckpt.path, str):  # in object storage: what its manifest records
        num_bytes, num_files = int(manifest.get("total_bytes") or 0), len(manifest.get("files") or {})
    elif ckpt.path.is_dir():
        num_bytes, num_files = tree_usage(ckpt.path)
    else:
        num_bytes, num_files = ckpt.path.stat().st_size, 1
    integrity = (f"manifest with {manifest['checksum_algorithm']} checksums" if manifest.get("checksum_algorithm")
                 else "manifest, sizes only" if manifest else "no cairn manifest: no checksums")
    lines.append(("files", f"{num_files}, {human_bytes(num_bytes)} on disk; {integrity}"))
    for name, group in (manifest.get("grouped") or {}).items() if ckpt.format == "dcp" else ():
        lost = [p for p in ckpt.problems if any(repr(key) in p or f"{key}:" in p for key in group["keys"])]
        lines.append((name, f"{describe({name: group})}, [{name}={group['size']}] below: "
                            + (f"{len(lost)} problem(s), listed" if lost else "every one present, whole")))
    if manifest.get("hf_dropped"):
        lines.append(("dropped", f"{len(manifest['hf_dropped'])} tensor(s) Hugging Face has no place for: "
                                 + ", ".join(manifest["hf_dropped"])))
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
    if isinstance(value, torch.Tensor):
        return f"tensor {shape_text(value.shape)} {short_dtype(value.dtype)}"
    return repr(value)


def _jsonable(value: Any) -> Any:
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
        lines += [style.red(line) for line in wrapped(f"CORRUPT: {relative_to_step(problem, ckpt.path)}")]
    data_files = sorted({name for e in entries.values() for name in e.files}, key=file_order)
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
    grouped = grouped_record(ckpt.manifest)  # an MoE's experts: "[experts=8]" after their keys
    for group, total in totals.items():
        lines.append(style.bold(_group_heading(group, total)))
        members = [e for e in entries.values() if e.group == group]
        list_values = list_all or bool(values) or total["values"] <= LISTED_VALUES_PER_GROUP
        prefix = "" if group == "model" else group + "."
        for entry in members:
            if not entry.is_tensor and not list_values:
                continue
            name = entry.key.removeprefix(prefix)
            if entry.key in grouped:
                name += f" [{grouped[entry.key][0]}={grouped[entry.key][1]}]"
            lines += _entry_lines(entry, name, columns, values)
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
    grouped = grouped_record(manifest)
    header = {k: manifest.get(k) for k in ("step", "kind", "storage", "dtype", "layout", "model", "created",
                                             "torch_version", "cairn_version", "checksum_algorithm") if k in manifest}
    return {
        "path": str(ckpt.path), "format": ckpt.format, **header, "problems": ckpt.problems,
        "groups": _group_totals(entries.values()),
        "grouped": {name: {"size": g["size"], "tensors": len(g["keys"])} for name, g in
                    (manifest.get("grouped") or {}).items()},
        "entries": [{"key": e.key, "group": e.group, "type": "tensor" if e.is_tensor else "value",
                     "shape": list(e.shape) if e.shape is not None else None,
                     "dtype": str(e.dtype).removeprefix("torch.") if e.dtype is not None else None,
                     "bytes": e.num_bytes, "files": e.files,
                     **({"members": list(grouped[e.key])} if e.key in grouped else {}),
                     **({"value": _jsonable(values[e.key])} if e.key in values else {})}
                    for e in entries.values()],
    }


# Downloads a command reads from, removed when the command's process ends.
_DOWNLOADS = contextlib.ExitStack()
atexit.register(_DOWNLOADS.close)


def open_any(location: str, tolerate_corrupt: bool = False):
    """The reader of a checkpoint path, or of a step in object storage (read there, not downloaded)."""
    if not is_object_uri(location):
        return open_checkpoint(Path(location), tolerate_corrupt=tolerate_corrupt)
    try:
        store, step = open_step(location, "checkpoint")
    except CheckpointError:  # not DCP (a Hugging Face folder in a bucket): read from a verified download
        local = _DOWNLOADS.enter_context(local_folder(location, "checkpoint"))
        ckpt = open_checkpoint(local, tolerate_corrupt=tolerate_corrupt)
        ckpt.path = location.rstrip("/")
        return ckpt
    try:
        if isinstance(step, int) and (store.read_manifest(step) or {}).get("storage") == "hf":
            local = _DOWNLOADS.enter_context(store.local_copy(step))
            ckpt = open_checkpoint(local, tolerate_corrupt=tolerate_corrupt)
            ckpt.path = location.rstrip("/")
            return ckpt
        manifest, problems = None, []
        if isinstance(step, int):
            try:
                manifest = store.read_manifest(step)
            except CheckpointError as e:
                if not tolerate_corrupt:
                    raise
                problems = list(getattr(e, "problems", None) or [str(e)])
        return DcpCheckpoint.from_reader(location.rstrip("/"), store.reader(step), manifest, problems)
    except CheckpointError as e:
        raise CheckFailed(first_line(e), location) from e


def cmd_inspect(args: argparse.Namespace) -> int:
    path = args.step_dir
    ckpt = open_any(path, tolerate_corrupt=True)
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
    if not path.exists():
        raise UsageError("no such file or directory", path)
    if path.is_file():
        detect_format(path)
        return [path]
    with contextlib.suppress(UsageError):
        detect_format(path)
        return [path]
    folder = resolve_folder(path)
    storage = LocalStore(folder)
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
    if path.is_file():
        return _verify_torch_file(path, advance)
    notes: list[str] = []
    manifest, problems = read_manifest_quietly(path)
    num_bytes = tree_usage(path)[0]
    if manifest is None and not problems and is_hf_dir(path):
        return Verdict(path, "structure", _hf_structure_problems(path), [
            "no cairn manifest (not written by cairn): safetensors headers and sizes checked, no checksums"],
            num_bytes)
    done = 0

    def progress(now: int, total: int) -> None:
        nonlocal done
        advance(now - done)
        done = now

    problems = problems or LocalStore(path.parent).verify(path, checksums=checksums, progress=progress,
                                                                  notes=notes)
    if manifest and manifest.get("grouped") and not problems:
        notes.append(f"{describe(manifest['grouped'])}: every one present, whole")
    if manifest is None:
        checked = "structure"
    else:
        checked = "checksums" if checksums and manifest.get("checksum_algorithm") else "sizes"
    return Verdict(path, checked, problems, notes, num_bytes)


def _hf_structure_problems(path: Path) -> list[str]:
    try:
        HFWeights(path)
    except CheckpointError as e:
        return [first_line(e)]
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
                lines += wrapped(f"- {relative_to_step(problem, verdict.path)}", indent="  ")
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


def relative_to_step(problem: str, step: Path | str) -> str:
    if isinstance(step, str):
        return problem.replace(f"{step}/", "")
    return problem.replace(f"{step}{os.sep}", "") if step.is_dir() else problem


def _verify_remote(location: str, checksums: bool) -> list[Verdict]:
    store = open_store(location)
    parent, _, name = location.rstrip("/").rpartition("/")
    step = step_of(name)
    if step is not None and step in open_store(parent).committed_steps():
        store, steps = open_store(parent), [step]
    else:
        steps = list(reversed(store.committed_steps()))
        if not steps:
            raise UsageError("no committed checkpoint here: not a step or a folder of steps", location)
    verdicts = []
    for step in steps:
        notes: list[str] = []
        problems = store.verify(step, checksums=checksums, notes=notes)
        manifest = None
        with contextlib.suppress(CheckpointError):
            manifest = store.read_manifest(step)
        verdicts.append(Verdict(store.step_url(step), "checksums" if checksums else "sizes", problems, notes,
                                int((manifest or {}).get("total_bytes") or 0)))
    return verdicts


def cmd_verify(args: argparse.Namespace) -> int:
    if is_object_uri(args.path):
        return _report_verdicts(_verify_remote(args.path, not args.quick), args)
    targets = verify_targets(Path(args.path))
    checksums = not args.quick
    total = sum(_planned_bytes(path, checksums) for path in targets)
    verdicts = []
    with progress_bar(total, "verify", show_progress(args)) as advance:
        for path in targets:
            verdicts.append(verify_one(path, checksums, advance))
    return _report_verdicts(verdicts, args)


def _report_verdicts(verdicts: list[Verdict], args: argparse.Namespace) -> int:
    """Print ``verify``'s verdicts (a table, or JSON with ``--json``); its exit status."""
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
    members: str | None = None  # a grouped tensor's differing members: "experts 3, 5"

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def compare_tensors(a, b) -> tuple[float, float]:
    """(max |a - b|, that divided by max |a|), in float64 for integers and float64 inputs, else float32.

    Elements equal on both sides (including matching infinities and NaNs at the same places)
    count as 0; a NaN on one side only makes both results NaN.
    """
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
    grouped = {**grouped_record(getattr(b, "manifest", None)), **grouped_record(getattr(a, "manifest", None))}
    for batch in read_batches(tensors, entries_a):
        read_a, read_b = a.read(batch), b.read(batch)
        for key in batch:
            max_abs, max_rel = compare_tensors(read_a[key], read_b[key])
            dtype_a, dtype_b = (str(t.dtype).removeprefix("torch.") for t in (read_a[key], read_b[key]))
            status = "equal" if max_abs <= atol else "different"  # NaN compares false: different
            if dtype_a != dtype_b and status == "equal":
                status = "dtype"
            members = None
            if key in grouped and status == "different":
                members = f"{grouped[key][0]} {index_ranges(_differing_rows(read_a[key], read_b[key], atol))}"
            results[key] = KeyDiff(key, status, max_abs, max_rel, dtype_a, dtype_b, members=members)
            advance(entries_a[key].num_bytes)
        del read_a, read_b
    if values:
        read_a, read_b = a.read(values), b.read(values)
        for key in values:
            results[key] = KeyDiff(key, "equal" if same_value(read_a[key], read_b[key]) else "different")
    order = list(entries_a) + [k for k in entries_b if k not in entries_a]
    return [results[key] for key in order]


def _differing_rows(a: torch.Tensor, b: torch.Tensor, atol: float) -> list[int]:
    """Indices along dim 0 where ``a`` and ``b`` differ by more than ``atol`` (an expert's slice)."""
    x, y = a.detach().double(), b.detach().double()
    differs = ((x - y).abs() > atol) | (x.isnan() != y.isnan())
    return differs.flatten(1).any(dim=1).nonzero().flatten().tolist()


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
    if d.members:
        return d.members + " differ"
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
    a, b = open_any(args.a), open_any(args.b)
    a, b = _as_comparable(a, b, args.model_name), _as_comparable(b, a, args.model_name)
    total = sum(e.num_bytes for e in a.entries().values() if e.is_tensor and (not groups or e.group in groups))
    with progress_bar(total, "diff", show_progress(args)) as advance:
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


def _convert_remote(src: str, dst: str, to: str, options: ConvertOptions) -> dict:
    """A conversion with either end in object storage: the source downloaded (and verified) into a
    temporary folder, the result written into one and uploaded to the destination."""
    with local_folder(src, "convert") as source, tempfile.TemporaryDirectory(prefix="cairn-convert-") as scratch:
        result = Path(scratch) / "converted" if is_object_uri(dst) else Path(dst)
        stats = convert_checkpoint(source, result, to, options)
        if is_object_uri(dst):
            upload_local(result, dst)
    return stats


def cmd_convert(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    options = ConvertOptions(model_name=args.model_name, flavor=args.model_flavor, export_dtype=args.export_dtype,
                             hf_assets_path=args.hf_assets_path, max_shard_bytes=args.max_shard_bytes,
                             progress=show_progress(args), model_only=args.model_only)
    if args.hf_assets_path and not Path(args.hf_assets_path).is_dir():
        raise UsageError("--hf_assets_path: no such directory", args.hf_assets_path)
    start = time.perf_counter()
    if is_object_uri(args.src) or is_object_uri(args.dst):
        stats = _convert_remote(args.src, args.dst, args.to, options)
    else:
        stats = convert_checkpoint(src, dst, args.to, options)
    what = f"{stats['tensors']} tensors" + (f" and {stats['values']} other values" if stats.get("values") else "")
    print(f"wrote {display_path(dst)} ({args.to}): {what}, {human_bytes(stats.get('bytes'))} in "
          f"{time.perf_counter() - start:.1f} s")
    return EXIT_OK
