"""Search: price every candidate, keep those that fit, rank by predicted step time.

Recompute and offload only ever cost time in the model, so offload tiers are tried only for a
base layout none of whose recompute policies fits without them (cheapest tier first); the
tiers after the first that fits are recorded as dominated rather than priced. Sharding
across nodes multiplies every base by up to ~40 choices (dp_shard x hpZ x qwZ x qgZ) that
change only a few parts of its time, so those choices are priced only for bases whose other
parts leave room to win (``search``: a branch and bound, exact for the chosen layout).
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


# The parts of a step's time no sharding-across-nodes choice changes (dp_shard, hpZ, qwZ and
# qgZ change only ZeRO's collectives, the sync reductions over the shard group, and the
# optimizer and offload work on the shard): their sum bounds every sharding choice of a base.
UNSHARDED_PARTS = ("compute", "tp_sp_comm", "micro_batch_overhead", "bubble", "pp_comm")


def sharding_bound(estimates: list[Estimate]) -> float:
    """A lower bound on the step time of every sharding choice of the base these estimates
    (its flat candidates, any recompute policy and tier) were priced for."""
    return min(sum(e.time[k] for k in UNSHARDED_PARTS) for e in estimates)


def _price_base(cfg: Config, space: Space, base: StrategyConfig, costs, world: int, budget: float,
                args: ModelArgs, recomputes: list[str]) -> tuple[list, list, int]:
    """(fitting, not fitting, dominated count) of one base over its offload tiers and recompute
    policies, cheapest tier first: the tiers after the first that fits are dominated."""
    ok, others = [], []
    missing = _shape_ok(costs, base)
    if missing:
        space.rejected.append((base, missing))
        return ok, others, 0
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
            return ok, others, (len(offloads) - i - 1) * len(recomputes)
    return ok, others, 0


def search(cfg: Config, world: int, costs, budget: float | None = None, exhaustive: bool = False) -> Plan:
    """Every candidate for ``cfg`` on ``world`` ranks, priced by ``costs``; fastest that fits first.

    Where sharding across nodes is searched (``Space.searches_sharding``) and not
    ``exhaustive``, in two phases (branch and bound): every base is priced with its flat
    sharding choice first (the free sharding keys at their defaults); then, bases in the order
    of ``sharding_bound``, every other sharding choice (dp_shard, hpZ, qwZ, qgZ) of a base
    whose bound does not exceed the fastest step found so far. A skipped choice cannot be the
    fastest, so the chosen layout is the exhaustive search's; what ``ranked`` leaves out are
    sharded variants slower than it. A base with no fitting flat candidate is never retried:
    each sharding choice only adds memory (a larger ZeRO shard, hpZ's secondary copy, the
    quantizers' buffers).
    """
    budget = budget if budget is not None else costs.device_budget
    space = Space(cfg, world, getattr(costs, "ranks_per_node", None))
    args = ModelArgs.from_config(cfg.model)
    ok, others, dominated = [], [], 0  # ok: (enumeration order, estimate), ties keep that order
    recomputes = space.recompute_options()
    two_phase = not exhaustive and space.searches_sharding()
    bounds: list[tuple[float, int, StrategyConfig]] = []  # (sharding_bound, order, flat base)

    def price(base: StrategyConfig, order: tuple[int, int]) -> tuple[list, list]:
        nonlocal dominated
        got, missed, dom = _price_base(cfg, space, base, costs, world, budget, args, recomputes)
        ok.extend((order, e) for e in got)
        others.extend(missed)  # in place: a copy per base made the search quadratic
        dominated += dom
        return got, missed

    for i, base in enumerate(space.bases(sharded=not two_phase)):
        got, missed = price(base, (i, 0))
        if got and two_phase:
            bounds.append((sharding_bound(got + missed), i, base))
    priced = 0
    best = min((e.step_s for _, e in ok), default=float("inf"))
    for bound, i, flat in sorted(bounds, key=lambda t: t[:2]):
        if bound > best:
            break
        priced += 1
        for j, base in enumerate(space.sharded(flat, space.dp_of(flat), skip=flat), 1):
            got, _ = price(base, (i, j))
            best = min([best, *(e.step_s for e in got)])
    ok = [e for _, e in sorted(ok, key=lambda oe: (oe[1].step_s, oe[0]))]
    tokens = cfg.run.global_batch_size * cfg.model.seq_len
    plan = Plan(world, costs.name, budget, tokens, flops_per_token(args) * tokens,
                getattr(costs, "peak_flops", None), ok, others, space.rejected, dominated)
    plan.chosen = ok[0] if ok else None
    if two_phase:
        plan.notes.append(f"sharding across nodes (dp_shard, hpZ, qwZ, qgZ) priced for {priced} of the "
                          f"{len(bounds)} flat layouts that fit (the others' bound exceeds the fastest step)")
    return plan


def chosen_strategy(plan: Plan, world: int) -> StrategyConfig:
    """The chosen layout as a plain (auto: false) StrategyConfig with dp resolved."""
    if plan.chosen is None:
        reasons = "; ".join(f"{n} x {r}" for r, n in plan.reason_counts().most_common(3))
        raise ConfigError(f"strategy: auto found no layout for world_size={world} that fits and runs "
                          f"here ({reasons})")
    s = plan.chosen.strategy
    return dataclasses.replace(s, auto=False, dp=dp_degree(s, world))
