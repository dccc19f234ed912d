"""Search: price every candidate, keep those that fit, rank by predicted step time.

Recompute and offload only ever cost time in the model, so offload tiers are tried only for a
base layout none of whose recompute policies fits without them (cheapest tier first); the
tiers after the first that fits are recorded as dominated rather than priced.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field

from tetrad.config import ConfigError
from tetrad.config.schema import Config, StrategyConfig
from tetrad.models.args import ModelArgs
from tetrad.models.counts import flops_per_token
from tetrad.strategy.memory import per_rank
from tetrad.strategy.offload_cost import chosen_host_gb
from tetrad.strategy.shapes import dp_degree, micro_batches, rank_params, shard_group
from tetrad.strategy.space import Space
from tetrad.strategy.timing import step_time



@dataclass
class Estimate:
    strategy: StrategyConfig
    time: dict[str, float]
    memory: dict[str, float]
    status: str = "ok"           # ok | oom | unavailable
    reason: str = ""
    measured_s: float | None = None

    @property
    def step_s(self) -> float:
        return self.time["total"]


@dataclass
class Plan:
    world: int
    costs_name: str
    budget: float
    tokens_per_step: int
    flops_per_step: float
    peak_flops: float | None
    ranked: list[Estimate]                        # fits and runs, fastest first
    others: list[Estimate]                        # out of memory or not in this build
    rejected: list[tuple[StrategyConfig, str]]    # invalid combinations, with the reason
    dominated: int = 0
    chosen: Estimate | None = None
    notes: list[str] = field(default_factory=list)

    def tokens_per_s(self, e: Estimate) -> float:
        return self.tokens_per_step / (e.measured_s or e.step_s)

    def mfu(self, e: Estimate) -> float | None:
        """Model-FLOPs utilisation (no recompute counted) against the hardware's peak."""
        if not self.peak_flops:
            return None
        return self.flops_per_step / ((e.measured_s or e.step_s) * self.world * self.peak_flops)

    def reason_counts(self) -> Counter:
        """Rejection reasons with their numbers blanked, counted (the summary `plan` prints)."""
        counts = Counter(_template(r) for _, r in self.rejected)
        counts.update(_template(e.reason) for e in self.others)
        if self.dominated:
            counts["dominated: a cheaper offload tier of the same layout already fits"] += self.dominated
        return counts


def _template(reason: str) -> str:
    text = re.sub(r"\d+(\.\d+)?", "N", reason.split(";")[0])
    return text[:140]


def _fits(mem: dict, costs, budget: float) -> str:
    device = mem["device"] + (mem["host"] if costs.same_pool else 0.0)
    if device > budget:
        return f"out of memory: needs {device / 1e9:.2f} GB per rank, budget {budget / 1e9:.2f} GB"
    if not costs.same_pool and mem["host"] > costs.host_budget:
        return f"out of host memory: offload needs {mem['host'] / 1e9:.1f} GB per rank"
    disk = getattr(costs, "disk_budget", None)
    if disk is not None and mem["disk"] > disk:
        return f"out of disk: the nvme tier needs {mem['disk'] / 1e9:.1f} GB per rank, {disk / 1e9:.1f} GB free"
    return ""


def with_placement(cfg: Config, s: StrategyConfig, costs, world: int, args: ModelArgs) -> StrategyConfig:
    """An nvme-tier candidate whose ``host_memory_gb`` the user left to the plan gets the
    placement the spec's host memory allows (``auto`` resolved to GiB, what the runtime would
    find on that machine): the plan says what rests in memory and what in files."""
    if "nvme" not in (s.offload.optimizer, s.offload.params) or "offload.host_memory_gb" in cfg.strategy.given:
        return s
    shard = rank_params(args, s) / (shard_group(s, world) if s.zero else 1)
    m = micro_batches(cfg.run.global_batch_size, s, world)
    auto = dataclasses.replace(s.offload, host_memory_gb="auto")
    gb = chosen_host_gb(dataclasses.replace(s, offload=auto), costs, shard, cfg.run.precision,
                        cfg.optimizer.state_dtype, m)
    return dataclasses.replace(s, offload=dataclasses.replace(s.offload, host_memory_gb=gb))


def estimate(cfg: Config, s: StrategyConfig, costs, world: int, budget: float,
             args: ModelArgs | None = None) -> Estimate:
    args = args or ModelArgs.from_config(cfg.model)
    state = cfg.optimizer.state_dtype
    s = with_placement(cfg, s, costs, world, args)
    t = step_time(args, s, costs, world, cfg.run.global_batch_size, cfg.run.precision, state)
    mem = per_rank(args, s, costs, world, cfg.run.global_batch_size, cfg.run.precision, state)
    reason = _fits(mem, costs, budget)
    return Estimate(s, t, mem, "oom" if reason else "ok", reason)


def _shape_ok(costs, s: StrategyConfig) -> str:
    has = getattr(costs, "has_shape", None)
    if has is not None and not has(s.tp, s.sp):
        return f"tp={s.tp}, sp={s.sp}: shard shape not in the profile (re-profile with --force)"
    return ""


def search(cfg: Config, world: int, costs, budget: float | None = None) -> Plan:
    """Every candidate for ``cfg`` on ``world`` ranks, priced by ``costs``; fastest that fits first."""
    budget = budget if budget is not None else costs.device_budget
    space = Space(cfg, world, getattr(costs, "ranks_per_node", None))
    args = ModelArgs.from_config(cfg.model)
    ok, others, dominated = [], [], 0
    recomputes = space.recompute_options()
    for base in space.bases():
        missing = _shape_ok(costs, base)
        if missing:
            space.rejected.append((base, missing))
            continue
        offloads = space.offload_options(base)
        if offloads and offloads[0] == ("none", "none") and len(offloads) > 1:
            # Is there any hope with the most memory-saving offload? If not, skip every tier.
            saving = space.with_options(base, recomputes[-1], *offloads[-1])
            if saving is not None:
                e = estimate(cfg, saving, costs, world, budget, args)
                if e.status == "oom":
                    others.append(e)
                    offloads = offloads[:1]
        for i, (opt, par) in enumerate(offloads):
            found = False
            for rc in recomputes:
                c = space.with_options(base, rc, opt, par)
                if c is None:
                    continue
                e = estimate(cfg, c, costs, world, budget, args)
                found |= e.status == "ok"
                (ok if e.status == "ok" else others).append(e)
            if found:
                dominated += (len(offloads) - i - 1) * len(recomputes)
                break
    ok.sort(key=lambda e: e.step_s)
    tokens = cfg.run.global_batch_size * cfg.model.seq_len
    plan = Plan(world, costs.name, budget, tokens, flops_per_token(args) * tokens,
                getattr(costs, "peak_flops", None), ok, others, space.rejected, dominated)
    plan.chosen = ok[0] if ok else None
    return plan


def chosen_strategy(plan: Plan, world: int) -> StrategyConfig:
    """The chosen layout as a plain (auto: false) StrategyConfig with dp resolved."""
    if plan.chosen is None:
        reasons = "; ".join(f"{n} x {r}" for r, n in plan.reason_counts().most_common(3))
        raise ConfigError(f"strategy: auto found no layout for world_size={world} that fits and runs "
                          f"here ({reasons})")
    s = plan.chosen.strategy
    return dataclasses.replace(s, auto=False, dp=dp_degree(s, world))
