"""`strategy.verify: K`: run a few real steps of the K best predictions and keep the measured best.

Runs inside the launched world (every rank calls it with the same plan, so every rank builds
the same engines in the same order). A candidate whose engine refuses it is pruned with the
engine's message; the step time of a candidate is the slowest rank's median.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
import torch.distributed as dist

from tetrad.config import ConfigError
from tetrad.config.schema import Config, StrategyConfig
from tetrad.engine import Engine
from tetrad.models import build_model
from tetrad.strategy.search import Plan
from tetrad.strategy.shapes import dp_degree


def measure_steps(cfg: Config, s: StrategyConfig, steps: int = 3) -> float:
    """Median seconds of steps 2..steps of ``s`` (the first pays for warm-up), slowest rank."""
    world = dist.get_world_size()
    model = build_model(cfg.model, seed=cfg.run.seed)
    engine = Engine(model, strategy=dataclasses.replace(s, dp=dp_degree(s, world)), optim_cfg=cfg.optimizer,
                    precision=cfg.run.precision, global_batch_size=cfg.run.global_batch_size,
                    total_steps=steps)
    local = cfg.run.global_batch_size // engine.layout.dp
    gen = torch.Generator().manual_seed(engine.dp_rank)
    times = []
    for _ in range(steps):
        ids = torch.randint(0, cfg.model.vocab_size, (local, cfg.model.seq_len + 1), generator=gen)
        dist.barrier()
        t0 = time.perf_counter()
        engine.train_step((ids[:, :-1], ids[:, 1:]))
        times.append(time.perf_counter() - t0)
    # on the engine's device: the process group's backend follows it (NCCL reduces device tensors)
    worst = torch.tensor([statistics.median(times[1:] or times)], dtype=torch.float64, device=engine.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    engine.close()
    return float(worst)


def verify_top(cfg: Config, plan: Plan, k: int, steps: int = 3) -> None:
    """Measure the k best predictions; re-rank them by measurement and update ``plan.chosen``."""
    tried = []
    for e in plan.ranked[:k]:
        try:
            e.measured_s = measure_steps(cfg, e.strategy, steps)
            tried.append(e)
        except ConfigError as err:  # refused before any collective ran: same on every rank
            e.status, e.reason = "unavailable", str(err)
            plan.others.append(e)
    plan.ranked = [e for e in plan.ranked if e.status == "ok"]
    if tried:
        plan.chosen = min(tried, key=lambda e: e.measured_s)
        plan.notes.append("verified: " + ", ".join(f"{e.step_s:.3g}s predicted / {e.measured_s:.3g}s measured"
                                                    for e in tried))
