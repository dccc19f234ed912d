"""`python -m tetrad data ...`: offline data preparation commands."""

from __future__ import annotations

import argparse
import sys

from .errors import DataError
from .prepare import prepare_text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tetrad data", description="Prepare training data.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize a UTF-8 text file into a token file")
    prep.add_argument("text", metavar="TEXT", help="input UTF-8 text file")
    prep.add_argument("out", metavar="OUT", help="output token file (use as data.source: tokens:OUT)")
    return parser


def data_main(argv: list[str]) -> int:
    """Run a `tetrad data` subcommand; return the process exit code (0 ok, 1 data error)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            n_tokens = prepare_text(args.text, args.out)
            print(f"{n_tokens} tokens written to {args.out}")
    except DataError as err:
        print(f"tetrad data: error: {err}", file=sys.stderr)
        return 1
    return 0
