"""`python -m tetrad data ...`: offline data preparation commands."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import DataError
from .packing import pack
from .prepare import prepare_text
from .tokenizer import ByteTokenizer, load_tokenizer

_KINDS = ("text", "jsonl", "parquet", "hf")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tetrad data", description="Prepare training data.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize a text file or a dataset into a token file")
    prep.add_argument("source", metavar="SOURCE",
                      help="a UTF-8 text file, or jsonl:PATH | parquet:PATH | hf:DIR | text:PATH "
                           "(PATH a file, a directory or a glob)")
    prep.add_argument("out", metavar="OUT", help="output token file (use as data.source: tokens:OUT)")
    prep.add_argument("--tokenizer", default="byte",
                      help="'byte' (default) or a directory with a saved Hugging Face tokenizer")
    prep.add_argument("--text-field", default="text", help="the column with each document's text (default text)")
    prep.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                      help="tokenizer processes (default: one per CPU)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def prepare(args) -> int:
    """Tokenize ``args.source`` into ``args.out``; documents end with the tokenizer's EOS."""
    if args.workers < 1:
        raise DataError(f"--workers={args.workers}: expected an integer >= 1")
    kind, sep, path = args.source.partition(":")
    if not (sep and kind in _KINDS):
        kind, path = "text", args.source
    tokenizer = load_tokenizer(args.tokenizer)
    if kind == "text" and isinstance(tokenizer, ByteTokenizer):
        return prepare_text(path, args.out)  # exact streaming, and unchanged for byte files
    return pack(f"{kind}:{path}", tokenizer, args.out, text_field=args.text_field, workers=args.workers,
                progress=not args.no_progress and sys.stderr.isatty())


def data_main(argv: list[str]) -> int:
    """Run a `tetrad data` subcommand; return the process exit code (0 ok, 1 data error)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            n_tokens = prepare(args)
            print(f"{n_tokens} tokens written to {args.out}")
    except DataError as err:
        print(f"tetrad data: error: {err}", file=sys.stderr)
        return 1
    return 0
