"""``cairn checkpoint ...``: the user's view of checkpoints (this module: the command line).

    cairn checkpoint ls <folder>                  the steps in a checkpoint folder, newest first
    cairn checkpoint clean <folder> [--yes]       remove what crashed saves left (a dry run without --yes)
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
``cairn checkpoint <cmd>: <what> (<path>)``, never a traceback. Output fits 80 columns (a
command printed to be copied stays whole on a line of its own);
colours only on a terminal, never with ``NO_COLOR`` set; progress bars go to stderr and
only to a terminal. The subcommands live in ``commands.py`` and ``plot.py``, what they print
in ``output.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from cairn.checkpoint.cli.output import EXIT_FAILED, EXIT_OK, EXIT_USAGE, WIDTH, details, wrapped
from cairn.checkpoint.layout import GROUPS

FORMATS = ("dcp", "hf", "torch")


_EXAMPLES = {
    "ls": """examples:
  cairn checkpoint ls outputs/checkpoint
  cairn checkpoint ls outputs --checksums        # a run's dump folder works too
  cairn checkpoint ls outputs/checkpoint --json | jq '.steps[0]'
  cairn checkpoint ls /dev/shm/cairn-0123456789ab --memory  # this node's tier
""",
    "clean": """Lists (a dry run), or with --yes removes, what crashed saves, deletes and probes
left behind: staging dirs and trash (a local folder), objects of saves no commit
marker names and multipart uploads never completed (s3://), and a stale lease.
Never a committed step. --yes takes the folder's lease first, as a run's start
does: it refuses while a live run holds the folder.

exit status: 0 done (or nothing to do), 2 refused (a live run holds the folder)
or a usage error.

examples:
  cairn checkpoint clean outputs/checkpoint         # what would go
  cairn checkpoint clean outputs/checkpoint --yes
  cairn checkpoint clean s3://bucket/runs/llama3-8b --yes
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
        "checkpoint", aliases=["ckpt"], formatter_class=_Formatter, help="list, inspect, verify, diff, convert, clean, plot",
        description="Look at, check, compare and convert training checkpoints (DCP step folders,\n"
                    "Hugging Face directories, single .pt files). No command runs code from a\n"
                    "checkpoint file.")
    checkpoint.set_defaults(run=None, help_parser=checkpoint)
    sub = checkpoint.add_subparsers(dest="subcommand", metavar="SUBCOMMAND")

    def add(name: str, run: str, short: str, summary: str, json_output: bool = True):
        parser = sub.add_parser(name, help=short, description=summary, epilog=_EXAMPLES[name],
                                formatter_class=_Formatter, parents=[_common(json_output)])
        parser.set_defaults(run=_guarded(name, run))
        return parser

    ls = add("ls", "commands.cmd_ls", "the steps of a checkpoint folder, newest first",
             "One row per step in a checkpoint folder, newest first: kind, committed or not,\n"
             "verified, dtype, size, files, saving layout, time; then the folder's lease and\n"
             "what crashed saves left (removed by `cairn checkpoint clean`).")
    ls.add_argument("folder", help="checkpoint folder (or a run's dump folder)")
    ls.add_argument("--checksums", action="store_true", help="hash every file (default: sizes only)")
    ls.add_argument("--memory", action="store_true",
                    help="FOLDER is a node's --checkpoint.memory_dir: list its memory snapshots and replicas")

    clean = add("clean", "folder.cmd_clean", "remove what crashed saves left (a dry run without --yes)",
                "Remove what crashed saves left in a checkpoint folder: staging dirs, trash,\n"
                "objects of saves never committed, unfinished uploads, a stale lease.")
    clean.add_argument("folder", help="checkpoint folder (or a run's dump folder, or s3://bucket/prefix)")
    clean.add_argument("-y", "--yes", action="store_true", help="remove them (default: list what would go)")
    clean.add_argument("--s3_unsafe_no_conditional_writes", action="store_true",
                       help="accept an s3:// store that ignores conditional writes (nothing then stops a run "
                            "from starting meanwhile)")

    inspect = add("inspect", "commands.cmd_inspect", "keys, shapes, dtypes, bytes and files of a checkpoint",
                  "What a checkpoint holds: keys by group (model, optimizer, lr_scheduler,\n"
                  "dataloader, train_state, rng), shapes, dtypes, bytes, files.")
    inspect.add_argument("step_dir", help="a step folder, a Hugging Face directory or a .pt file")
    inspect.add_argument("--group", action="append", metavar="GROUP", help=f"only these groups ({', '.join(GROUPS)})")
    inspect.add_argument("--all", action="store_true", help="list every non-tensor value too")
    inspect.add_argument("--values", action="store_true", help="read and show non-tensor values (steps, seeds, ...)")

    verify = add("verify", "commands.cmd_verify", "check every file against its checksum; exit 1 if corrupt",
                 "Check every file of a step (or of every step in a folder) against the\n"
                 "checksums in its manifest.")
    verify.add_argument("path", help="a step folder, a checkpoint folder, an HF directory or a .pt file")
    verify.add_argument("--quick", action="store_true", help="sizes and structure only, no checksums")

    diff = add("diff", "commands.cmd_diff", "per-tensor differences of two checkpoints; exit 1 if any",
               "Per-tensor max absolute and relative differences between two checkpoints,\n"
               "keys only in one of them, dtype and shape changes.")
    diff.add_argument("a", help="checkpoint a (step folder, HF directory or .pt)")
    diff.add_argument("b", help="checkpoint b")
    diff.add_argument("--atol", type=float, default=0.0, help="largest difference counted as equal (default 0)")
    diff.add_argument("--only", action="append", metavar="GROUP", help="compare only these groups, e.g. model")
    diff.add_argument("--all", action="store_true", help="list equal tensors and every one-sided key too")
    diff.add_argument("--model_name", default="llama3", help="model family, to read HF names (default llama3)")

    convert = add("convert", "commands.cmd_convert", "DCP <-> Hugging Face <-> single .pt, streaming",
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
    convert.add_argument("--model_only", action="store_true",
                         help="DCP to DCP: keep the model only (drop optimizer, data and RNG state)")

    plot = add("plot", "plot.cmd_plot", "loss curves of runs, checkpoint saves marked",
               "Loss curves of runs from their metrics.jsonl, checkpoint saves marked.",
               json_output=False)
    plot.add_argument("run_dirs", nargs="+", metavar="run_dir", help="a run's dump folder (or its metrics.jsonl)")
    plot.add_argument("-o", "--output", default="loss.png", help="image file (.png, .svg, .pdf; default loss.png)")
    plot.add_argument("--metric", default="loss", help="what to plot: loss, grad_norm, lr, ... (default loss)")
    plot.add_argument("--title", default=None, help="plot title")


def _guarded(name: str, run: str) -> Callable[[argparse.Namespace], int]:
    """Runs a subcommand (``module.function`` in this package, imported only when it runs, so
    ``--help`` never imports torch); user errors become one line on stderr and an exit status,
    never a traceback."""

    def guarded(args: argparse.Namespace) -> int:
        from cairn.checkpoint import errors
        from cairn.checkpoint.api import single_process_dcp

        module, function = run.split(".")
        command = getattr(importlib.import_module(f"cairn.checkpoint.cli.{module}"), function)
        prefix = f"cairn checkpoint {name}"
        cairn_logger = logging.getLogger("cairn")
        saved_level = cairn_logger.level
        cairn_logger.setLevel(logging.INFO if args.verbose else logging.ERROR)
        handler = logging.StreamHandler(sys.stderr) if args.verbose else None
        if handler is not None:
            cairn_logger.addHandler(handler)
        try:
            with single_process_dcp():
                return command(args)
        except errors.UsageError as e:
            return _fail(prefix, e.what, e.path, [], EXIT_USAGE)
        except errors.CheckFailed as e:
            return _fail(prefix, e.what, e.path, details(e.__cause__) if e.__cause__ else [], EXIT_FAILED)
        except KeyboardInterrupt:
            return _fail(prefix, "interrupted", None, [], 130)
        except BrokenPipeError:  # `cairn checkpoint inspect ... | head`
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
        except Exception as e:
            if args.verbose or not isinstance(e, (errors.CheckpointError, OSError, ValueError)):
                raise  # a bug (or --verbose): the traceback is what a report needs
            bad_data = isinstance(e, (errors.CorruptCheckpointError, errors.UnsafeCheckpointError))
            return _fail(prefix, errors.first_line(e), None, details(e), EXIT_FAILED if bad_data else EXIT_USAGE)
        finally:
            cairn_logger.setLevel(saved_level)
            if handler is not None:
                cairn_logger.removeHandler(handler)

    return guarded


def _fail(prefix: str, what: str, path: Any, lines: list[str], status: int) -> int:
    where = f" ({path})" if path is not None and str(path) not in what else ""
    sys.stdout.flush()
    print(f"{prefix}: {what}{where}", file=sys.stderr)
    for line in lines:
        indent = " " * (len(line) - len(line.lstrip()))
        for part in wrapped(line.strip(), indent=indent):
            print(part, file=sys.stderr)
    return status
