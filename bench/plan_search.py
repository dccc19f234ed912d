"""Planner search cost: candidates priced and seconds, two-phase search against the exhaustive one.

One JSON line per (case, mode): the number of ``estimate`` calls (exact, load-independent),
CPU and wall seconds, and the chosen layout with its predicted step (docs/benchmarks.md,
"Search time"). The exhaustive mode is the search before sharding choices were bounded.

    PYTHONPATH=$PWD python bench/plan_search.py paper_384 gpt_6.7b_32 [--modes two_phase,exhaustive]
    PYTHONPATH=$PWD python bench/plan_search.py gpt3_175b_1024 --modes two_phase   # minutes
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
from pathlib import Path

from tetrad.config import load_config
from tetrad.models.args import ModelArgs
from tetrad.strategy.hardware import load_hardware
from tetrad.strategy.report import layout
from tetrad.strategy.spec_costs import SpecCosts

ROOT = Path(__file__).resolve().parents[1]
GPT = {"arch": "gpt", "vocab_size": 51200, "seq_len": 2048}
CASES = {  # hardware, world, model (None: the paper's config file), global batch, precision
    "paper_384": ("v100_dgx2_100g", 384, None, 0, "fp16"),
    "gpt_6.7b_32": ("v100_dgx2_100g", 32, {**GPT, "d_model": 4096, "n_layers": 32, "n_heads": 32}, 128, "fp16"),
    "gpt3_175b_1024": ("a100_80gb_cluster", 1024, {**GPT, "d_model": 12288, "n_layers": 96, "n_heads": 96},
                       1536, "bf16"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="+", choices=sorted(CASES))
    ap.add_argument("--modes", default="two_phase,exhaustive")
    args = ap.parse_args()
    search_mod = importlib.import_module("tetrad.strategy.search")  # the package re-exports `search`
    calls = [0]
    priced = search_mod.estimate

    def counted(*a, **k):
        calls[0] += 1
        return priced(*a, **k)

    search_mod.estimate = counted
    for name in args.cases:
        hw, world, model, batch, precision = CASES[name]
        cfg = load_config(ROOT / "examples/configs/zeropp_18b.yaml" if model is None else
                          {"run": {"global_batch_size": batch, "precision": precision}, "model": model,
                           "strategy": "auto"})
        costs = SpecCosts(load_hardware(hw), ModelArgs.from_config(cfg.model), precision)
        for mode in args.modes.split(","):
            calls[0] = 0
            wall, cpu = time.perf_counter(), time.process_time()
            plan = search_mod.search(cfg, world, costs, exhaustive=mode == "exhaustive")
            print(json.dumps({"case": name, "mode": mode, "estimates": calls[0],
                              "cpu_s": round(time.process_time() - cpu, 2), "wall_s": round(time.perf_counter() - wall, 2),
                              "chosen": layout(plan.chosen.strategy, world), "step_s": round(plan.chosen.step_s, 4)}),
                  flush=True)


if __name__ == "__main__":
    main()
