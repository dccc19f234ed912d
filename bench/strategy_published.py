"""The cost model against published training runs it was, and was not, fitted to.

    python bench/strategy_published.py               # every run; the planner's own pick too
    python bench/strategy_published.py --no-search   # predictions only (seconds, not minutes)
    python bench/strategy_published.py --refit       # fit again from the prior, then report

One JSON line per published run (tetrad/strategy/published/*.yaml): its split (fit: the
calibration used it; test: held out, never fitted on), the published and predicted seconds
per step and tokens/s, the error, the predicted and published peak memory (torch's reserved
bytes, where published), whether the published layout is predicted to fit in memory, and
the planner's own pick on the same hardware, world, batch and framework with its predicted
speed-up over the published layout (>= 1 means the pick is predicted at least as fast).
Then one summary line per split: throughput MAPE, worst memory error, layouts fitting,
picks at least as fast. Calibration: the shipped hardware/calibration.yaml unless --refit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def _config(run, precision: str):
    from tetrad.config import load_config

    m = run.model
    model = {"arch": m.arch, "vocab_size": m.vocab_size, "d_model": m.d_model, "n_layers": m.n_layers,
             "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads, "d_ff": m.d_ff, "seq_len": m.seq_len,
             "dropout": m.dropout, "tie_embeddings": m.tie_embeddings}
    return load_config({"run": {"global_batch_size": run.global_batch, "precision": precision},
                        "model": model, "strategy": "auto"})


def _pick(pred) -> dict:
    """The planner's fastest layout for the run's world and batch, priced like the run."""
    from tetrad.strategy.report import layout
    from tetrad.strategy.search import search

    run = pred.run
    t0 = time.perf_counter()
    plan = search(_config(run, run.precision), run.gpus, pred.costs)
    if plan.chosen is None:
        return {"pick": None, "pick_speedup": None, "search_s": time.perf_counter() - t0}
    return {"pick": layout(plan.chosen.strategy, run.gpus), "pick_step_s": plan.chosen.step_s,
            "pick_speedup": pred.step_s / plan.chosen.step_s, "search_s": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-search", action="store_true", help="skip the planner's own pick")
    p.add_argument("--refit", action="store_true", help="fit the calibration again (deterministic)")
    args = p.parse_args(argv)

    from tetrad.strategy.calibrate import fit, predict
    from tetrad.strategy.hardware import calibration
    from tetrad.strategy.published import load_published
    from tetrad.strategy.report import layout

    runs = load_published()
    calib = calibration()
    if args.refit:
        calib = fit(runs)
        print(json.dumps({"refit": True, "matches_shipped": calib == calibration()}), flush=True)
    rows = []
    for run in runs:
        pred = predict(run, calib)
        measured = run.measured_step_s()
        row = {"id": run.id, "split": run.split, "source": run.source, "hardware": run.hardware,
               "gpus": run.gpus, "layout": layout(run.strategy(**pred.fill), run.gpus),
               "filled": pred.fill or None, "published_step_s": round(measured, 4),
               "predicted_step_s": round(pred.step_s, 4),
               "published_tokens_per_s": round(run.tokens_per_step / measured, 1),
               "predicted_tokens_per_s": round(run.tokens_per_step / pred.step_s, 1),
               "error": round(pred.error, 4), "fits": pred.fits,
               "predicted_memory_gib": round(pred.memory_gib, 2), "published_memory_gib": run.memory_gib,
               "memory_error": None if run.memory_gib is None else round(pred.memory_gib / run.memory_gib - 1, 4)}
        if not args.no_search:
            row.update(_pick(pred))
        rows.append(row)
        print(json.dumps(row), flush=True)
    for split in ("fit", "test"):
        part = [r for r in rows if r["split"] == split]
        mem = [abs(r["memory_error"]) for r in part if r["memory_error"] is not None]
        picks = [r["pick_speedup"] for r in part if r.get("pick_speedup") is not None]
        print(json.dumps({"split": split, "runs": len(part), "sources": len({r["source"] for r in part}),
                          "throughput_mape": round(statistics.fmean(abs(r["error"]) for r in part), 4),
                          "max_abs_error": round(max(abs(r["error"]) for r in part), 4),
                          "memory_runs": len(mem), "memory_max_abs_error": round(max(mem), 4) if mem else None,
                          "published_layouts_fit": sum(r["fits"] for r in part),
                          "picks_at_least_as_fast": None if args.no_search else sum(s >= 1 - 1e-9 for s in picks),
                          "median_pick_speedup": round(statistics.median(picks), 3) if picks else None}),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
