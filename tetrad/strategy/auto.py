"""`strategy: auto` for a run: profile this world, search, optionally verify, write the choice.

Called by the Trainer on every rank before the engine is built. Every rank plans from rank 0's
profile (broadcast by the profiler), so all ranks choose the same layout deterministically.
Writes ``strategy.yaml``, ``strategy_candidates.json`` and ``profile.json`` to the run's
output directory.
"""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from tetrad.config.schema import Config, StrategyConfig
from tetrad.models.args import ModelArgs
from tetrad.parallel.launch import init_distributed
from tetrad.profiler import ProfileOptions, load_or_profile
from tetrad.strategy.measured import MeasuredCosts
from tetrad.strategy.report import strategy_yaml, table, write_json
from tetrad.strategy.search import chosen_strategy, search
from tetrad.strategy.verify import verify_top


def resolve_auto(cfg: Config, opts: ProfileOptions | None = None) -> StrategyConfig:
    """The strategy `strategy: auto` resolves to on the launched world (keys the user gave kept)."""
    init_distributed()
    world = dist.get_world_size()
    out = Path(cfg.run.output_dir)
    args = ModelArgs.from_config(cfg.model)
    profile, _ = load_or_profile(args, cfg.run.precision, world, path=out / "profile.json",
                                 opts=opts or ProfileOptions.quick())
    costs = MeasuredCosts(profile, args, cfg.run.precision)
    plan = search(cfg, world, costs)
    if cfg.strategy.verify > 0:
        verify_top(cfg, plan, cfg.strategy.verify)
    chosen = chosen_strategy(plan, world)
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "strategy.yaml").write_text(strategy_yaml(chosen))
        write_json(plan, out / "strategy_candidates.json")
        print(table(plan, top=5), flush=True)
    return chosen
