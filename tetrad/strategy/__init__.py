"""Strategy selection: candidates, memory and time cost models, search, verification, plans.

    from tetrad.strategy import search, MeasuredCosts, SpecCosts, load_hardware
    plan = search(config, world, SpecCosts(load_hardware("a100_80gb"), args, "bf16"))
    plan.chosen.strategy, plan.mfu(plan.chosen)

Decides from measurements (tetrad.profiler) or a cluster spec; never runs training itself
(verification asks the engine to run a few steps). `strategy: auto` goes through ``auto.py``.
"""

from tetrad.strategy.hardware import HardwareSpec, load_hardware
from tetrad.strategy.measured import MeasuredCosts
from tetrad.strategy.search import Estimate, Plan, chosen_strategy, search
from tetrad.strategy.spec_costs import SpecCosts

__all__ = ["Estimate", "HardwareSpec", "MeasuredCosts", "Plan", "SpecCosts", "chosen_strategy",
           "load_hardware", "search"]
