"""``python -m tetrad train|data|plan|profile|ckpt ...``"""

from __future__ import annotations

import argparse
import sys

from tetrad.config import ConfigError


def _train(args: argparse.Namespace) -> int:
    from tetrad.trainer.trainer import Trainer

    history = Trainer(args.config, overrides=args.set).fit()
    if history and history[-1].get("step"):
        return 0
    return 1


def _data(args: argparse.Namespace) -> int:
    from tetrad.data.cli import data_main

    return data_main(args.rest)


def _not_yet(args: argparse.Namespace) -> int:
    print(f"tetrad {args.command}: not available in this build yet", file=sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tetrad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a YAML config")
    train.add_argument("config", help="path to the run's YAML file")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (repeatable)")
    train.set_defaults(func=_train)
    data = sub.add_parser("data", help="prepare token files", add_help=False)
    data.add_argument("rest", nargs=argparse.REMAINDER)
    data.set_defaults(func=_data)
    for name in ("plan", "profile", "ckpt"):
        p = sub.add_parser(name, help=f"{name} (not yet available)")
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_not_yet)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"tetrad: config error: {err}", file=sys.stderr)
        return 2
