"""Strategy selection accuracy on this machine: predicted vs measured step time per layout.

    python bench/strategy.py [--world 4] [--steps 6] [--rounds 2] [--max-layouts 40] [--profile PATH] [--force]
    python bench/strategy.py --reprice RUN.jsonl [--profile PATH]

``--reprice`` measures nothing: it prices the layouts of an earlier run's output (its JSON
lines) again from the profile that run saved, with the cost model as it is now, against the
step times that run measured (for checking a cost-model change on the same measurements).

A small Llama-style model at world 4. Profiles the machine (reused when it matches), prices
every candidate, then runs, in one spawned world, the layouts the engine accepts: every
(tp, pp, sp, zero, micro-batch) combination with recompute none and the default schedule, plus
the 5 best predictions (whatever their recompute / Megatron-SP / schedule). One JSON line per
layout (predicted and measured seconds per step), then a summary line: MAPE, the selected layout's measured throughput against the measured
best, and the best of the DeepSpeed-autotuner-like subset (ZeRO stage x micro-batch size only,
tp = pp = sp = 1).

Measured seconds per step: each layout runs ``--rounds`` times, the rounds going round-robin
over all layouts (so a burst of other work on the machine, or the first layout's process
warm-up, hits one round of a layout rather than all of them); a round's value is the
slowest rank's median of steps 2..N, and the layout's value is the lowest round. Other
processes on the machine only ever add time, so the lowest round is the one closest to the
machine the profile measured (the profile is taken right before, and its 1-minute load
average is reported with the summary).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

MODEL = {"arch": "llama", "vocab_size": 256, "d_model": 128, "n_layers": 4, "n_heads": 4, "seq_len": 128}


def _config(batch: int):
    from tetrad.config import load_config

    return load_config({"run": {"global_batch_size": batch, "precision": "fp32", "output_dir": "/tmp/tetrad-bench"},
                        "model": MODEL, "strategy": "auto"})


def _pick(plan, limit: int) -> list:
    """The 5 best predictions, then one per (tp, pp, sp, zero, mbs) with recompute none."""
    chosen, seen = list(plan.ranked[:5]), set()
    for e in plan.ranked:
        s = e.strategy
        key = (s.tp, s.pp, s.sp, s.zero, s.micro_batch_size)
        default = s.recompute == "none" and not s.megatron_sp and s.pipeline_schedule == "1f1b"
        if default and key not in seen:
            seen.add(key)
            if e not in chosen:
                chosen.append(e)
    return chosen[:limit]


def _run_all(cfg_dict: dict, strategies: list[dict], steps: int, rounds: int = 1) -> list:
    """In one world: measured seconds per strategy and round (None + reason where the engine refuses)."""
    from tetrad.config import ConfigError, load_config
    from tetrad.config.schema import StrategyConfig
    from tetrad.config.fields import build
    from tetrad.strategy.verify import measure_steps

    cfg = load_config(cfg_dict)
    out = [([], "") for _ in strategies]
    for _ in range(max(1, rounds)):
        for i, raw in enumerate(strategies):
            if out[i][1]:
                continue
            s = build(StrategyConfig, raw, "strategy")
            try:
                out[i][0].append(measure_steps(cfg, s, steps))
            except ConfigError as err:
                out[i] = ([], str(err))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-layouts", type=int, default=40)
    p.add_argument("--profile", default="/tmp/tetrad-bench-profile.json")
    p.add_argument("--force", action="store_true")
    p.add_argument("--reprice", metavar="RUN_JSONL")
    args = p.parse_args(argv)
    if args.reprice:
        return _reprice(args)

    from tetrad.models.args import ModelArgs
    from tetrad.profiler import ProfileOptions, load_or_profile
    from tetrad.profiler.spawn import run_local
    from tetrad.strategy.measured import MeasuredCosts
    from tetrad.strategy.report import layout
    from tetrad.strategy.search import search

    cfg = _config(args.batch)
    margs = ModelArgs.from_config(cfg.model)
    profile, reused = load_or_profile(margs, "fp32", args.world, path=args.profile, force=args.force,
                                      opts=ProfileOptions(mbs=[1, 2, 4], reps=5))
    print(json.dumps({"profile_s": profile["seconds"], "reused": reused, "load_average": os.getloadavg()[0],
                      "contention": profile.get("contention")}), flush=True)
    plan = search(cfg, args.world, MeasuredCosts(profile, margs, "fp32"))
    picked = _pick(plan, args.max_layouts)
    raws = [dataclasses.replace(e.strategy, dp="auto").to_dict(full=True) for e in picked]
    measured = run_local(_run_all, args.world, cfg.to_dict(), raws, args.steps, args.rounds, timeout=1800)
    rows = []
    for e, (runs, why) in zip(picked, measured):
        secs = min(runs) if runs else None
        row = {"layout": layout(e.strategy, args.world), "predicted_s": e.step_s, "measured_s": secs,
               "rounds_s": runs, "error": None if secs is None else (e.step_s - secs) / secs,
               "refused": why or None,
               "parts_s": {k: round(v, 5) for k, v in e.time.items() if k != "total"}}
        rows.append((e, row))
        print(json.dumps(row), flush=True)
    print(json.dumps(_summary(rows, plan, args.world)), flush=True)
    return 0


def _reprice(args) -> int:
    from tetrad.models.args import ModelArgs
    from tetrad.profiler import store
    from tetrad.strategy.measured import MeasuredCosts
    from tetrad.strategy.report import layout
    from tetrad.strategy.search import search

    cfg = _config(args.batch)
    margs = ModelArgs.from_config(cfg.model)
    profile = store.load(args.profile)
    if profile is None:
        raise SystemExit(f"{args.profile}: no profile of this version to reprice from")
    plan = search(cfg, args.world, MeasuredCosts(profile, margs, "fp32"))
    by_layout = {layout(e.strategy, args.world): e for e in plan.ranked}
    rows = []
    with open(args.reprice) as f:
        for line in f:
            old = json.loads(line)
            e = by_layout.get(old.get("layout"))
            if e is None or not old.get("measured_s"):
                continue
            secs = old["measured_s"]
            row = {"layout": old["layout"], "predicted_s": e.step_s, "measured_s": secs,
                   "error": (e.step_s - secs) / secs, "was_predicted_s": old["predicted_s"],
                   "parts_s": {k: round(v, 5) for k, v in e.time.items() if k != "total"}}
            rows.append((e, row))
            print(json.dumps(row), flush=True)
    print(json.dumps({"repriced": args.reprice, **_summary(rows, plan, args.world)}), flush=True)
    return 0


def _summary(rows, plan, world: int) -> dict:
    from tetrad.strategy.report import layout

    ok = [(e, r) for e, r in rows if r["measured_s"]]
    mape = sum(abs(r["error"]) for _, r in ok) / len(ok)
    best = min(ok, key=lambda er: er[1]["measured_s"])
    selected = next((er for er in ok if er[0] is plan.ranked[0]), ok[0])
    ds = [er for er in ok if er[0].strategy.tp == er[0].strategy.pp == er[0].strategy.sp == 1]
    ds_best = min(ds, key=lambda er: er[1]["measured_s"]) if ds else None
    return {"layouts": len(ok), "mape": mape,
            "selected": selected[1]["layout"], "selected_measured_s": selected[1]["measured_s"],
            "best": best[1]["layout"], "best_measured_s": best[1]["measured_s"],
            "selected_vs_best_throughput": best[1]["measured_s"] / selected[1]["measured_s"],
            "ds_autotuner_subset_best": ds_best[1]["layout"] if ds_best else None,
            "ds_subset_best_measured_s": ds_best[1]["measured_s"] if ds_best else None,
            "load_average": os.getloadavg()[0]}


if __name__ == "__main__":
    sys.exit(main())
