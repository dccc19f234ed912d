"""`tetrad plan` and `tetrad profile`.

    python -m tetrad plan CONFIG.yaml --world-size N [--hardware HW.yaml] [--top K] [--json PATH] [--out STRATEGY.yaml]
                          [--explain "tp2 pp4 z1 mbs2 full"]
    python -m tetrad profile [CONFIG.yaml] [--world-size N] [--out PROFILE.json] [--force] [--spec-out HW.yaml]

Without --hardware, `plan` prices layouts with a profile of this machine at that world size
(measured on the launched world under torchrun, else on spawned local ranks; reused when it
matches) and prunes what the engine cannot run in this build. With --hardware (a YAML path or
a shipped name: a100_40gb, a100_80gb, h100_sxm, h100_pcie, h100_nvl, h200, ...) nothing is measured; the world size
defaults to the cluster's.
"""

from __future__ import annotations

import argparse
import json
import sys

from tetrad.config import Config, load_config
from tetrad.models.args import ModelArgs


def _plan_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tetrad plan", description="rank parallel layouts and explain the choice")
    p.add_argument("config", help="run config YAML (model, run.global_batch_size, run.precision, strategy)")
    p.add_argument("--world-size", type=int, default=None, help="ranks to plan for (default: launch world, "
                   "or the --hardware cluster's)")
    p.add_argument("--hardware", default=None, help="cluster spec YAML, or a shipped name")
    p.add_argument("--top", type=int, default=10, help="rows of the ranked table")
    p.add_argument("--json", nargs="?", const="strategy_candidates.json", default=None, metavar="PATH",
                   help="write every candidate as JSON (default path strategy_candidates.json)")
    p.add_argument("--out", default=None, help="write the chosen strategy as YAML here")
    p.add_argument("--profile", default=None, help="profile JSON to use or create (this machine only)")
    p.add_argument("--memory-gb", type=float, default=None, help="override the per-rank memory budget")
    p.add_argument("--explain", default=None, metavar="LAYOUT",
                   help="print where one layout's time and memory go, e.g. 'tp2 pp4 z1 mbs2 full' "
                        "(tokens as the table prints them; keys left out keep the config's)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return p


def _explain(cfg: Config, plan, world: int, costs, text: str) -> str:
    """The breakdown of the plan's own estimate of LAYOUT, or LAYOUT priced on its own (with
    the rule it breaks, if it is not a valid layout)."""
    from tetrad.strategy.report import explain, layout, parse_layout
    from tetrad.strategy.search import estimate
    from tetrad.strategy.space import Space

    s = parse_layout(text, cfg.strategy)
    # the rule book, as the engine asks it (the cluster spec's node size: the launcher's stand-in)
    errors = Space(cfg, world, getattr(costs, "ranks_per_node", None)).problems(s)
    if errors:
        return f"--explain {text!r}: not a valid layout here: {errors[0]}"
    want = layout(s, world)
    for e in plan.ranked + plan.others:
        if layout(e.strategy, world) == want:
            return explain(plan, e)
    return explain(plan, estimate(cfg, s, costs, world, plan.budget))


def _costs(cfg: Config, args: argparse.Namespace, world: int):
    margs = ModelArgs.from_config(cfg.model)
    if args.hardware:
        from tetrad.strategy.hardware import load_hardware
        from tetrad.strategy.spec_costs import SpecCosts

        return SpecCosts(load_hardware(args.hardware), margs, cfg.run.precision)
    from tetrad.profiler import load_or_profile
    from tetrad.strategy.measured import MeasuredCosts

    profile, reused = load_or_profile(margs, cfg.run.precision, world, path=args.profile)
    print(f"profile: {'reused' if reused else 'measured'} ({profile['seconds']:.1f}s to measure)", file=sys.stderr)
    return MeasuredCosts(profile, margs, cfg.run.precision)


def _world(args: argparse.Namespace) -> int:
    if args.world_size:
        return args.world_size
    if args.hardware:
        from tetrad.strategy.hardware import load_hardware

        return load_hardware(args.hardware).world
    from tetrad.parallel.launch import detect_launch

    return detect_launch().world_size


def plan_main(argv: list[str]) -> int:
    from tetrad.strategy.report import strategy_yaml, table, write_json
    from tetrad.strategy.search import search

    args = _plan_parser().parse_args(argv)
    cfg = load_config(args.config, args.set)
    world = _world(args)
    costs = _costs(cfg, args, world)
    budget = args.memory_gb * 1e9 if args.memory_gb else None
    plan = search(cfg, world, costs, budget=budget)
    print(table(plan, args.top))
    if args.explain:
        print(_explain(cfg, plan, world, costs, args.explain))
    if args.json:
        write_json(plan, args.json)
    if plan.chosen is None:
        return 1
    if args.out:
        from tetrad.strategy.search import chosen_strategy

        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(strategy_yaml(chosen_strategy(plan, world)))
    return 0


def profile_main(argv: list[str]) -> int:
    from tetrad.profiler import ProfileOptions, load_or_profile

    p = argparse.ArgumentParser(prog="tetrad profile", description="measure this machine for a model")
    p.add_argument("config", nargs="?", default=None, help="run config YAML (default: the tiny built-in model)")
    p.add_argument("--world-size", type=int, default=None, help="ranks to measure (default: launch world)")
    p.add_argument("--out", default=None, help="profile JSON path (default: the cache, keyed by model+hardware)")
    p.add_argument("--force", action="store_true", help="re-measure even if a matching profile exists")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    p.add_argument("--spec-out", default=None, metavar="HW.yaml",
                   help="also write this machine as a cluster spec (its fitted curves) for `plan --hardware`")
    args = p.parse_args(argv)
    cfg = load_config(args.config) if args.config else Config()
    world = args.world_size or _world(argparse.Namespace(world_size=None, hardware=None))
    opts = ProfileOptions.quick() if args.quick else ProfileOptions()
    margs = ModelArgs.from_config(cfg.model)
    profile, reused = load_or_profile(margs, cfg.run.precision, world, path=args.out, force=args.force, opts=opts)
    from tetrad.profiler.report import summary

    print(summary(profile, margs, cfg.run.precision))
    print(f"{'reused' if reused else 'measured in'} {profile['seconds']:.1f}s", file=sys.stderr)
    if args.spec_out:
        from tetrad.strategy.machine_spec import spec_from_profile, spec_yaml

        with open(args.spec_out, "w", encoding="utf-8") as fh:
            fh.write(spec_yaml(spec_from_profile(profile), args.out or ""))
        print(f"wrote {args.spec_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(plan_main(sys.argv[1:]))
