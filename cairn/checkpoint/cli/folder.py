"""What a checkpoint folder holds beside its steps, and ``cairn checkpoint clean``.

Beside its committed steps a folder (local or ``s3://``) may hold the lease of the run that
uses it and what crashes left: staging dirs, trash, objects of saves never committed,
multipart uploads never completed (``Leftover``, listed by the store). ``ls`` shows them;
``clean`` removes them: a dry run unless ``--yes``, and with ``--yes`` only while holding the
folder's lease, so never while a live run uses the folder (a stale lease, its run gone, is
taken over, as a run's start would). It never touches a committed step: the store lists only
what no commit names.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from cairn.checkpoint.cli.output import EXIT_OK, Style, human_bytes, local_time, plural, use_color, wrapped
from cairn.checkpoint.errors import UsageError
from cairn.checkpoint.fsio import display_path
from cairn.checkpoint.layout import MANIFEST_NAME, METADATA_NAME, Leftover
from cairn.checkpoint.lease import FolderBusyError, FolderLease, lease_state
from cairn.checkpoint.readers import is_step_folder
from cairn.checkpoint.store import is_object_uri, open_store

UNSAFE_FLAG = "--s3_unsafe_no_conditional_writes"


def command(*words: str) -> str:
    """A command line as a user can paste it (quoted where the shell needs it), on a line of its own."""
    return "  " + shlex.join(words)


def resolve_folder(path: Path) -> Path:
    """A checkpoint folder from what the user typed: the folder itself, or a run's dump folder."""
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


def open_folder(location: str, **options) -> tuple[object, str]:
    """(store, its name for messages and hints) of a checkpoint folder a user named."""
    if is_object_uri(location):
        store = open_store(location, **options)
        if not store.exists():
            raise UsageError("nothing there (no objects under that prefix)", location)
        return store, store.url
    folder = resolve_folder(Path(location))
    return open_store(folder), display_path(folder)


def lease_json(state: dict | None) -> dict | None:
    if state is None:
        return None
    holder = {k: v for k, v in state["holder"].items() if k != "token"}
    return {"holder": holder, "live": state["live"], "stale_reason": state["stale_reason"],
            "heartbeat_age_s": state["heartbeat_age_s"]}


def lease_lines(state: dict | None, name: str, style: Style) -> list[str]:
    """The lease of the folder in a line or two: who holds it, how old its heartbeat, live or stale."""
    if state is None:
        return ["lease: none (no run holds this folder)"]
    if state["live"]:
        return wrapped(f"lease: {state['text']}: {style.green('live')} (a run is using this folder)", indent="")
    return wrapped(f"lease: {state['text']}: {style.yellow('stale')} ({state['stale_reason']})", indent="")


def clean_hint(name: str, state: dict | None, num_leftovers: int) -> list[str]:
    """How to clean the folder now, as a command that works as printed (none while a run holds it)."""
    stale = state is not None and not state["live"]
    if state is not None and state["live"] or not (stale or num_leftovers):
        return []
    does = " and ".join(filter(None, ["takes over the stale lease" if stale else "",
                                      "removes what crashed saves left" if num_leftovers else ""]))
    return wrapped(f"the next training start {does}; to clean up now:", indent="") \
        + [command("cairn", "checkpoint", "clean", name, "--yes")]


def leftover_name(leftover: Leftover, folder: str) -> str:
    """A leftover's location relative to its folder."""
    return leftover.location.removeprefix(folder.rstrip("/") + "/") if leftover.location.startswith(folder) \
        else display_path(leftover.location)


def format_leftovers(leftovers: list[Leftover], folder: str, style: Style) -> list[str]:
    lines = []
    for leftover in leftovers:
        size = f", {human_bytes(leftover.num_bytes)}" if leftover.num_bytes is not None else ""
        when = f", {local_time(leftover.created)}" if leftover.created is not None else ""
        text = f"{leftover_name(leftover, folder)}: {leftover.why}{size}{when}"
        lines += wrapped(text if leftover.removable else style.dim(text))
    return lines


def cmd_clean(args: argparse.Namespace) -> int:
    options = {"s3_unsafe_no_conditional_writes": True} if args.s3_unsafe_no_conditional_writes else {}
    store, name = open_folder(args.folder, **options)
    style = Style(use_color(args.color))
    leftovers = store.leftovers()
    removable = [leftover for leftover in leftovers if leftover.removable]
    state = lease_state(store)
    if not args.yes:
        return _dry_run(args, store, name, leftovers, removable, state, style)
    if is_object_uri(args.folder):
        store.check_conditional_writes(opt_in=UNSAFE_FLAG)
    try:
        lease = FolderLease.acquire(store)
    except FolderBusyError:
        raise UsageError(f"refused: a live run holds this folder's lease ({state['text'] if state else 'a run'}); "
                         "clean it once that run has ended", name) from None
    try:
        removed = [leftover for leftover in store.leftovers() if leftover.removable
                   and store.remove_leftover(leftover) is not False]
    finally:
        lease.release()
    if args.json:
        print(json.dumps({"folder": name, "removed": [leftover.to_json() for leftover in removed],
                          "kept": [leftover.to_json() for leftover in leftovers if not leftover.removable],
                          "lease_taken_over": lease_json(state) if state else None}, indent=1))
        return EXIT_OK
    lines = [style.bold(f"cleaned {name}")]
    if state is not None:
        lines += wrapped(f"took over the stale lease of {state['text']} ({state['stale_reason']}), then released it")
    lines += [f"removed {plural(len(removed), 'leftover')}" + (f", {human_bytes(total)}" if (total := sum(
        leftover.num_bytes or 0 for leftover in removed)) else "") + (":" if removed else "")]
    lines += format_leftovers(removed, name, style)
    kept = [leftover for leftover in leftovers if not leftover.removable]
    if kept:
        lines.append("kept (not written by cairn; remove by hand if unwanted):")
        lines += format_leftovers(kept, name, style)
    print("\n".join(lines))
    return EXIT_OK


def _dry_run(args, store, name: str, leftovers: list[Leftover], removable: list[Leftover], state: dict | None,
             style: Style) -> int:
    if args.json:
        print(json.dumps({"folder": name, "dry_run": True, "lease": lease_json(state),
                          "leftovers": [leftover.to_json() for leftover in leftovers]}, indent=1))
        return EXIT_OK
    lines = [style.bold(f"checkpoint folder {name}")] + lease_lines(state, name, style)
    if not removable and (state is None or state["live"]):
        lines.append("nothing to clean: no leftovers of crashed saves" + (
            "" if not leftovers else f" ({plural(len(leftovers), 'dir')} not written by cairn, left alone)"))
        print("\n".join(lines))
        return EXIT_OK
    total = sum(leftover.num_bytes or 0 for leftover in removable)
    lease = "take over the stale lease and " if state is not None and not state["live"] else ""
    lines.append(f"would {lease}remove {plural(len(removable), 'leftover')}" + (f" ({human_bytes(total)})" if total
                                                                               else "")
                 + "; nothing is changed without --yes" + (":" if removable else ""))
    lines += format_leftovers(removable, name, style)
    if state is not None and state["live"]:
        lines += wrapped("a live run holds the lease: `--yes` refuses until it has ended (a save in progress "
                         "looks like a leftover)", indent="")
    else:
        words = ["cairn", "checkpoint", "clean", name, "--yes"]
        if args.s3_unsafe_no_conditional_writes:
            words.append(UNSAFE_FLAG)
        lines += ["to remove them:", command(*words)]
    print("\n".join(lines))
    return EXIT_OK

