"""The ``cairn`` command. Subcommands live with their component; this file only routes.

    cairn checkpoint ls|inspect|verify|diff|convert|plot ...   (cairn/checkpoint/cli.py)

Training itself is ``./run_train.sh`` / ``python -m cairn.train``. Nothing here imports
torch, so ``cairn --help`` answers at once.
"""

from __future__ import annotations

import argparse
import sys

import cairn


class CliParser(argparse.ArgumentParser):
    """argparse with one-line errors, ``cairn checkpoint ls: <problem> (see ... --help)``, exit 2.

    Subcommand parsers inherit the class, so every level answers the same way.
    """

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from cairn.checkpoint.cli import add_checkpoint_parser

    parser = CliParser(
        prog="cairn", description="cairn: tools for training runs and their checkpoints.",
        epilog="Training: ./run_train.sh (or python -m cairn.train --help).\n"
               "Checkpoints: cairn checkpoint --help.",
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=80))
    parser.add_argument("--version", action="version", version=f"cairn {cairn.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_checkpoint_parser(commands)
    parser.set_defaults(run=None, help_parser=parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.run is None:  # a command group without its subcommand: show what it offers
        args.help_parser.print_help(sys.stderr)
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
