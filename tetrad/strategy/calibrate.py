"""Fit the cost model's efficiency parameters to published runs, and test on the held-out ones.

    python -m tetrad.strategy.calibrate            # fit on the fit half, report both halves
    python -m tetrad.strategy.calibrate --write    # ... and write hardware/calibration.yaml
    python -m tetrad.strategy.calibrate --check    # the shipped calibration is this fit's result

What is fitted (``PARAMETERS``): per accelerator family the GEMM and flash-attention ``top``
(the large-size share of the peak), within bounds: four numbers. How each framework runs
(attention kernel, loss buffers, reduction precision, overlap) is stated per source from its
code (``tetrad.strategy.software``), never fitted.
The objective is the mean |log(predicted / published step time)| over the runs marked
``fit`` (symmetric in over- and under-prediction); ``test`` runs are never evaluated during
the fit. The search is deterministic: cyclic coordinate descent with a golden-section search
per parameter over its bounds, from the prior values, for a fixed number of sweeps.
Memory: the allocator's fragmentation share is the median over fit runs with published peak
memory of (published / predicted allocator bytes) - 1.

Keys a source left unpublished (micro-batch size, schedule) are filled, for each evaluation,
with the fastest prediction among the valid choices (``published.fill_options``): the runs
were tuned, and the planner's best guess is what a user would get.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

from tetrad.strategy.hardware import GIB, calibration
from tetrad.strategy.memory import per_rank
from tetrad.strategy.published import Run, fill_options, hardware_of, load_published
from tetrad.strategy.spec_costs import SpecCosts
from tetrad.strategy.timing import step_time

# (dotted path in calibration.yaml, low, high)
PARAMETERS = (
    ("families.ampere.gemm.top", 0.4, 1.0),
    ("families.ampere.attention.top", 0.15, 1.0),
    ("families.hopper.gemm.top", 0.3, 1.0),
    ("families.hopper.attention.top", 0.1, 1.0),
)
SWEEPS = 4
GOLDEN_STEPS = 24
# Where the fit starts, and the values it does not fit: the size halves of the curves
# (GEMM dimension, flash sequence length) are the shapes of vendor microbenchmarks, not fitted.
PRIOR = {
    "families": {"ampere": {"gemm": {"top": 0.8, "half_dim": 64}, "attention": {"top": 0.55, "half_seq": 512}},
                 "hopper": {"gemm": {"top": 0.7, "half_dim": 64}, "attention": {"top": 0.4, "half_seq": 512}}},
    "memory": {"fragmentation": 0.1},
}


@dataclass
class Prediction:
    run: Run
    step_s: float
    fill: dict
    memory: dict
    budget: float
    costs: SpecCosts

    @property
    def error(self) -> float:
        measured = self.run.measured_step_s()
        return (self.step_s - measured) / measured

    @property
    def fits(self) -> bool:
        return self.memory["device"] <= self.budget

    @property
    def memory_gib(self) -> float:
        return self.memory["allocator"] / GIB


def _get(d: dict, path: str):
    for part in path.split("."):
        d = (d or {}).get(part, {})
    return d if d != {} else None


def _set(d: dict, path: str, value) -> dict:
    parts = path.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
    d[parts[-1]] = value
    return d


def predict(run: Run, calib: dict) -> Prediction:
    """The run priced by the spec cost model under ``calib`` (unknown keys filled fastest)."""
    spec = hardware_of(run, calib)
    costs = SpecCosts(spec, run.model, run.precision, run.software, calib)
    best = None
    for fill in fill_options(run):
        s = run.strategy(**fill)
        t = step_time(run.model, s, costs, run.gpus, run.global_batch, run.precision)["total"]
        mem = per_rank(run.model, s, costs, run.gpus, run.global_batch, run.precision)
        key = (mem["device"] > costs.device_budget, t)   # the published run fitted: prefer fills that fit
        if best is None or key < best[0]:
            best = (key, fill, mem)
    (_, t), fill, mem = best
    return Prediction(run, t, fill, mem, costs.device_budget, costs)


def log_error(preds: list[Prediction]) -> float:
    return statistics.fmean(abs(math.log(p.step_s / p.run.measured_step_s())) for p in preds)


def mape(preds: list[Prediction]) -> float:
    return statistics.fmean(abs(p.error) for p in preds)


def _golden(f, lo: float, hi: float, steps: int) -> float:
    g = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


def fit(runs: list[Run], prior: dict | None = None, parameters=PARAMETERS, sweeps: int = SWEEPS) -> dict:
    """A calibration (the prior with the fitted parameters) from the ``fit`` runs only."""
    calib = copy.deepcopy(PRIOR if prior is None else prior)
    train = [r for r in runs if r.split == "fit"]
    used = [p for p in parameters if any(_uses(r, p[0]) for r in train)]

    def objective(path: str, value: float) -> float:
        trial = copy.deepcopy(calib)
        _set(trial, path, round(value, 6))
        return log_error([predict(r, trial) for r in train if _uses(r, path)])

    for _ in range(sweeps):
        for path, lo, hi in used:
            best = _golden(lambda v, p=path: objective(p, v), lo, hi, GOLDEN_STEPS)
            _set(calib, path, round(best, 4))
    fitted = [predict(r, calib) for r in train]
    with_mem = [p for p in fitted if p.run.memory_gib is not None]
    if with_mem:
        ratios = [p.run.memory_gib * GIB / (p.memory["allocator"] - p.memory["terms"]["fragmentation"])
                  for p in with_mem]
        _set(calib, "memory.fragmentation", round(max(0.0, statistics.median(ratios) - 1), 4))
    calib["fit"] = {"runs": sorted(r.id for r in train), "objective": "mean |log(predicted/published)|",
                    "value": round(log_error(fitted), 4),
                    "command": "python -m tetrad.strategy.calibrate --write"}
    return calib


def _uses(run: Run, path: str) -> bool:
    """Whether ``path`` can change this run's prediction (its accelerator family)."""
    kind, name = path.split(".")[:2]
    if kind == "families":
        return _family(run.hardware) == name
    return True


@lru_cache(maxsize=None)
def _family(hardware: str) -> str:
    from tetrad.strategy.hardware import load_hardware

    return load_hardware(hardware, {}).family


def report(runs: list[Run], calib: dict) -> dict:
    preds = [predict(r, calib) for r in runs]
    out = {"runs": [], "calibration": {k: v for k, v in calib.items() if k != "fit"}}
    for p in preds:
        r = p.run
        out["runs"].append({"id": r.id, "split": r.split, "source": r.source, "hardware": r.hardware,
                            "predicted_step_s": p.step_s, "published_step_s": r.measured_step_s(),
                            "error": p.error, "fill": p.fill, "fits": p.fits,
                            "predicted_memory_gib": p.memory_gib, "published_memory_gib": r.memory_gib})
    for split in ("fit", "test"):
        part = [p for p in preds if p.run.split == split]
        mem = [abs(p.memory_gib / p.run.memory_gib - 1) for p in part if p.run.memory_gib]
        out[split] = {"runs": len(part), "mape": mape(part), "log_error": log_error(part),
                      "memory_max_error": max(mem) if mem else None,
                      "all_fit_memory": all(p.fits for p in part)}
    return out


def shipped_text(calib: dict) -> str:
    head = ("# Fitted by `python -m tetrad.strategy.calibrate --write` on the `fit` runs of\n"
            "# tetrad/strategy/published/*.yaml (see tetrad/strategy/calibrate.py); `test` runs were\n"
            "# not used. Accelerator families: gemm / attention curves (tetrad.strategy.efficiency);\n"
            "# memory: the caching allocator's share over what it hands out.\n")
    return head + yaml.safe_dump(calib, sort_keys=False)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tetrad.strategy.calibrate", description=__doc__.splitlines()[0])
    p.add_argument("--write", action="store_true", help="write the fit to hardware/calibration.yaml")
    p.add_argument("--check", action="store_true", help="exit 1 unless the shipped calibration is this fit")
    p.add_argument("--shipped", action="store_true", help="report the shipped calibration without fitting")
    args = p.parse_args(argv)
    runs = load_published()
    shipped = calibration()
    if args.shipped:
        print(json.dumps(report(runs, shipped), indent=1))
        return 0
    calib = fit(runs)
    if args.check:
        same = calib == shipped
        print("shipped calibration " + ("matches the fit" if same else "differs from the fit"))
        return 0 if same else 1
    result = report(runs, calib)
    print(json.dumps({k: result[k] for k in ("fit", "test", "calibration")}, indent=1))
    if args.write:
        path = resources.files("tetrad.strategy").joinpath("hardware/calibration.yaml")
        with open(str(path), "w", encoding="utf-8") as fh:
            fh.write(shipped_text(calib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
