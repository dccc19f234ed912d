"""``python -m tetrad train|data|plan|profile|ckpt ...``"""

from __future__ import annotations

import argparse
import sys
import traceback

from tetrad.config import ConfigError


def _train(args: argparse.Namespace) -> int:
    """0 when the run trained to ``run.steps``, was already there, or stopped for a
    preemption signal with its checkpoint; otherwise an exception that ``main`` prints."""
    from tetrad.trainer.preempt import Preemption

    # Before torch is imported (seconds): a scheduler's signal during startup or teardown is
    # remembered -- the run then stops cleanly before its first step -- instead of killing
    # the process with no message.
    preemption = Preemption().install()
    try:
        from tetrad.trainer.trainer import Trainer

        Trainer(args.config, overrides=args.set, trace=args.trace).fit(preemption)
        _shutdown_process_group()
    finally:
        preemption.restore()
    return 0


def _shutdown_process_group() -> None:
    """Tear the process group down before the interpreter exits: left to process exit, the
    backend's threads can be destroyed while joinable and abort the process (seen under
    mpiexec as "terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # no rank tears down while a peer still talks to it
        dist.destroy_process_group()


def _data(args: argparse.Namespace) -> int:
    from tetrad.data.cli import data_main

    return data_main(args.rest)


def _ckpt(args: argparse.Namespace) -> int:
    from tetrad.checkpoint.cli import ckpt_main

    return ckpt_main(args.rest)


def _strategy(args: argparse.Namespace) -> int:
    from tetrad.strategy.cli import plan_main, profile_main

    return (plan_main if args.command == "plan" else profile_main)(args.rest)


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
    train.add_argument("--trace", metavar="PATH", default=None,
                       help="write each pipeline rank's schedule as a Chrome trace "
                            "(PATH.rank<r>.json; open in chrome://tracing or Perfetto)")
    train.set_defaults(func=_train)
    data = sub.add_parser("data", help="prepare token files", add_help=False)
    data.add_argument("rest", nargs=argparse.REMAINDER)
    data.set_defaults(func=_data)
    ckpt = sub.add_parser("ckpt", help="inspect or export checkpoints", add_help=False)
    ckpt.add_argument("rest", nargs=argparse.REMAINDER)
    ckpt.set_defaults(func=_ckpt)
    for name, text in (("plan", "rank layouts for a world and explain the choice"),
                       ("profile", "measure this machine for the strategy selector")):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=_strategy)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] in (["plan"], ["profile"]) and argv[1:2] != ["-h"]:
        # They parse their own options, which may come first (argparse's REMAINDER drops those).
        args = argparse.Namespace(command=argv[0], rest=argv[1:], func=_strategy)
    else:
        args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"tetrad: config error: {err}", file=sys.stderr, flush=True)
        return 2
    except Exception as err:  # noqa: BLE001 - every non-zero exit says why, in one line first
        return _failed(err)
    except KeyboardInterrupt:  # before the training loop's own handler is installed, or after it
        print("tetrad: interrupted", file=sys.stderr, flush=True)
        return 130


def _failed(err: Exception) -> int:
    """Exit code for an error that stopped a command, after printing why.

    Errors that name their cause (a dead peer, a diverged run, failing checkpoint saves, a
    corrupt checkpoint, bad data, an inconsistent launcher environment, a full disk) print one
    line; anything else is a bug and keeps its traceback.
    """
    from tetrad.checkpoint.fileio import CheckpointError
    from tetrad.data.errors import DataError
    from tetrad.parallel.launch import LaunchError
    from tetrad.trainer.faults import TrainingFault

    if isinstance(err, LaunchError):
        print(f"tetrad: launch error: {err}", file=sys.stderr, flush=True)
        return 2
    if isinstance(err, (TrainingFault, CheckpointError, DataError, OSError)):
        print(f"tetrad: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1
    traceback.print_exc()
    print(f"tetrad: unexpected {type(err).__name__}: {err}", file=sys.stderr, flush=True)
    return 1
