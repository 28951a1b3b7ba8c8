"""The ``fastgim`` command line: one sub-command per module in :mod:`fastgim.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines ``add_parser(subparsers)`` which registers its sub-command and
# sets ``func`` (taking the parsed args, returning an exit code) as the default.
COMMANDS = ("explain", "evaluate", "chg")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgim", description="Fast GIM attribution and Causal Head Gating.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"fastgim.commands.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
