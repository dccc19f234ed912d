"""The search space: every layout of the world and global batch, invalid ones with the reason.

Validity is the rule book's (``tetrad.config.validate.problems``: heads and kv heads divisible
by tp, Ulysses heads by sp, the sequence by the cp x sp x Megatron-SP split, layers per pipeline chunk, world and batch
divisibility, ZeRO-2/3 with pp, offload tiers and step modes, ...), the same question the
engine asks, so `plan` and `train` can never disagree about what is valid. Cheap subsets of
the rules prune early (layouts, then bases); every candidate yielded passes all of them. Bounds of the enumeration, each a choice rather than a rule: micro-batch sizes up to
32 (larger ones only add activation memory once matmuls are saturated), virtual stages up to
8, and the recompute policies none/selective/full (`budget` needs a budget the user gives;
it is searched only when set). At pp = 1 the schedules are identical, so only 1f1b is kept.
Context parallelism is searched down to 4096 tokens per cp rank (ring attention is for long
sequences: below that a block's attention is too short to hide its K/V hop, and tp or
Ulysses split short sequences better), which also keeps the (cp, sp) pairs of a large world
few. Breadth-first is searched only where interleaved cannot run (micro-batches not a
multiple of pp): the cost model prices it at interleaved's bubble with GPipe's memory.
Keys the user fixed (``StrategyConfig.fixed_keys``) take their given value only.

Sharding across nodes (``ranks_per_node`` known, e.g. from a cluster spec; else the world is
one node and none of it is searched): ``dp_shard`` auto (flat) or a node's dp ranks times a
power of two below dp (one node, two, four, ... as MiCS groups them); ``zeropp.hpz`` 1 or a
node's dp ranks, when that is smaller than the shard group; qwZ and qgZ on or off, where the
ZeRO shard group spans nodes (inside one node NVLink leaves them little to win).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

from tetrad.config.schema import Config, OffloadConfig, StrategyConfig
from tetrad.config.validate import (ModelShape, batch_errors, layout_errors, problems, strategy_errors,
                                    strategy_world_errors)
from tetrad.strategy.hardware import members_per_node

MAX_MBS = 32
MAX_VIRTUAL = 8
MIN_CP_TOKENS = 4096
FREE_KEYS = ("tp", "pp", "sp", "cp", "megatron_sp", "zero", "micro_batch_size", "recompute",
             "pipeline_schedule", "virtual_stages", "offload.optimizer", "offload.params",
             "dp_shard", "zeropp.hpz", "zeropp.quantize_weights", "zeropp.quantize_grads")
SHARDING_KEYS = FREE_KEYS[-4:]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class Space:
    """Enumerates candidates for ``cfg`` on ``world`` ranks; ``rejected`` collects (strategy, reason)."""

    def __init__(self, cfg: Config, world: int, ranks_per_node: int | None = None):
        self.cfg, self.world = cfg, world
        base = cfg.strategy
        given = base.ranks_per_node
        self.ranks_per_node = ranks_per_node if given == "auto" else given
        self.fixed = {k for k in base.fixed_keys() if k in FREE_KEYS or k == "dp"}
        self.base = dataclasses.replace(base, auto=False)
        self.shape = ModelShape.of_config(cfg.model)
        self.rejected: list[tuple[StrategyConfig, str]] = []

    def _options(self, key: str, values) -> list:
        if key in self.fixed:
            return [_get(self.base, key)]
        return list(values)

    def _reject(self, s: StrategyConfig, errors: list[str]) -> bool:
        if errors:
            self.rejected.append((s, errors[0]))
        return bool(errors)

    def layouts(self) -> Iterator[StrategyConfig]:
        """(tp, pp, cp, sp, megatron_sp) combinations that fit the model and the world
        (cp_load_balance keeps its given value: the zigzag split is never slower)."""
        w = self.world
        for tp in self._options("tp", divisors(w)):
            for pp in self._options("pp", divisors(w // tp) if w % tp == 0 else [1]):
                rest = w // (tp * pp) if w % (tp * pp) == 0 else 1
                long_enough = [c for c in divisors(rest) if c == 1 or self.shape.seq_len / c >= MIN_CP_TOKENS]
                for cp in self._options("cp", long_enough):
                    for sp in self._options("sp", divisors(rest // cp) if rest % cp == 0 else [1]):
                        for msp in self._options("megatron_sp", [False, True] if tp > 1 else [False]):
                            s = dataclasses.replace(self.base, tp=tp, pp=pp, sp=sp, cp=cp, megatron_sp=msp)
                            if not self._reject(s, strategy_world_errors(s, w) + layout_errors(self.shape, s)):
                                yield s

    def _schedules(self, s: StrategyConfig, mbs: int) -> list[tuple[str, int]]:
        if s.pp == 1:
            return [(s.pipeline_schedule if "pipeline_schedule" in self.fixed else "1f1b", 1)]
        chunks = self.cfg.model.n_layers // s.pp
        out = [(name, 1) for name in ("gpipe", "1f1b", "zero_bubble", "zero_bubble_v")]
        dp = self.world // s.model_parallel_size
        micro = self.cfg.run.global_batch_size // max(1, dp * mbs)
        fixed_sched = "pipeline_schedule" in self.fixed
        looped = (["interleaved", "breadth_first"] if fixed_sched
                  else ["interleaved"] if micro % s.pp == 0 else ["breadth_first"])
        out += [(name, v) for name in looped
                for v in range(2, min(MAX_VIRTUAL, chunks) + 1) if self.cfg.model.n_layers % (s.pp * v) == 0]
        fixed_v = "virtual_stages" in self.fixed
        return [(n, v) for n, v in out if (not fixed_sched or n == s.pipeline_schedule)
                and (not fixed_v or v == s.virtual_stages)]

    def searches_sharding(self) -> bool:
        """Whether sharding across nodes is searched at all: the world spans nodes and some
        sharding key is free."""
        rpn = self.ranks_per_node
        return rpn is not None and rpn < self.world and not set(SHARDING_KEYS) <= self.fixed

    def dp_of(self, s: StrategyConfig) -> int:
        return self.world // s.model_parallel_size

    def bases(self, sharded: bool = True) -> Iterator[StrategyConfig]:
        """Layouts x ZeRO stage x micro-batch size x schedule x sharding choice, checked
        (recompute/offload not yet set). ``sharded`` False: only each one's first sharding
        choice the rule book accepts (the flat one, where the keys are free)."""
        batch = self.cfg.run.global_batch_size
        for lay in self.layouts():
            dp = self.world // lay.model_parallel_size
            per_rank = batch // dp if batch % dp == 0 else 1
            mbs_all = [b for b in divisors(per_rank) if b <= MAX_MBS]
            for zero in self._options("zero", range(4)):
                for mbs in self._options("micro_batch_size", mbs_all):
                    for sched, v in self._schedules(lay, mbs):
                        s = dataclasses.replace(lay, zero=zero, micro_batch_size=mbs,
                                                pipeline_schedule=sched, virtual_stages=v,
                                                recompute="none", offload=_offload(lay, "none", "none"))
                        # offload rules wait for the tiers (offload_options / with_options)
                        errors = [e for e in strategy_errors(s) if not e.rule.startswith("offload.")]
                        if not self._reject(s, errors + batch_errors(batch, s, dp)):
                            choices = self.sharded(s, dp)
                            yield from choices if sharded else itertools.islice(choices, 1)

    def sharded(self, s: StrategyConfig, dp: int, skip: StrategyConfig | None = None) -> Iterator[StrategyConfig]:
        """``s`` with each sharding-across-nodes choice (see the module doc) the rule book
        allows, in a fixed order; ``skip``: one already priced (the search's flat phase)."""
        for shard, hpz, qw, qg in self._sharding_options(s, dp):
            c = dataclasses.replace(s, dp_shard=shard, zeropp=dataclasses.replace(
                s.zeropp, hpz=hpz, quantize_weights=qw, quantize_grads=qg))
            if c == skip:
                continue
            errors = strategy_world_errors(c, self.world, self.ranks_per_node) + [
                e for e in strategy_errors(c) if e.rule.startswith("zeropp.")]
            if not self._reject(c, errors):
                yield c

    def _sharding_options(self, s: StrategyConfig, dp: int) -> list[tuple]:
        node = self._dp_per_node(s, dp)
        shards = ["auto"] + [node * 2 ** i for i in range(dp.bit_length())
                             if node > 0 and node * 2 ** i < dp and dp % (node * 2 ** i) == 0] if s.zero else ["auto"]
        out = []
        for shard in self._options("dp_shard", shards):
            width = dp if shard == "auto" else shard
            spans = node > 0 and width > node
            hpz = [1] + ([node] if s.zero == 3 and spans and node > 1 and width % node == 0 else [])
            qw = [False, True] if s.zero == 3 and spans else [False]
            qg = [False, True] if s.zero >= 2 and spans else [False]
            for h in self._options("zeropp.hpz", hpz):
                for w in self._options("zeropp.quantize_weights", qw):
                    for g in self._options("zeropp.quantize_grads", qg):
                        out.append((shard, h, w, g))
        return out

    def _dp_per_node(self, s: StrategyConfig, dp: int) -> int:
        """dp ranks of one gradient group on a node (0: the world is one node, or unknown)."""
        rpn = self.ranks_per_node
        if rpn is None or rpn >= self.world:
            return 0
        return members_per_node(dp * s.cp * s.sp, s.tp, rpn) // (s.cp * s.sp)

    def recompute_options(self) -> list[str]:
        if "recompute" in self.fixed:
            return [self.base.recompute]
        return ["none", "selective", "full"]

    def offload_options(self, s: StrategyConfig) -> list[tuple[str, str]]:
        """Valid (optimizer tier, params tier) pairs, cheapest first; (none, none) leads.

        Invalid pairs are recorded against the base with the offload rule they break."""
        tiers = ("none", "cpu", "nvme")
        opt = self._options("offload.optimizer", tiers)
        par = self._options("offload.params", tiers)
        out = []
        for o in opt:
            for p in par:
                why = _offload_rule(s, o, p)
                if why:
                    self.rejected.append((s, why))
                else:
                    out.append((o, p))
        out.sort(key=lambda op: tiers.index(op[0]) + tiers.index(op[1]))
        return out

    def with_options(self, s: StrategyConfig, recompute: str, opt: str, par: str) -> StrategyConfig | None:
        """The full candidate, or None (recorded) when any rule of the book refuses it."""
        c = dataclasses.replace(s, recompute=recompute, offload=_offload(s, opt, par))
        return None if self._reject(c, self.problems(c)) else c

    def candidates(self) -> Iterator[StrategyConfig]:
        """Every full candidate the rule book accepts: bases x offload tiers x recompute (the
        search walks the same pieces, skipping tiers a cheaper one makes pointless)."""
        for base in self.bases():
            for opt, par in self.offload_options(base):
                for recompute in self.recompute_options():
                    c = self.with_options(base, recompute, opt, par)
                    if c is not None:
                        yield c

    def problems(self, c: StrategyConfig) -> list[str]:
        """Every rule ``c`` breaks for this run: the engine's question, asked the same way."""
        run = self.cfg.run
        return problems(c, model=self.shape, precision=run.precision, grad_clip=self.cfg.optimizer.grad_clip,
                        world=self.world, global_batch=run.global_batch_size, compile=run.compile,
                        ranks_per_node=self.ranks_per_node)


def _offload_rule(s: StrategyConfig, opt: str, par: str) -> str:
    """The first offload rule (by rule identity) the tiers (opt, par) break on base ``s``;
    checked once per base layout, before any candidate is built."""
    c = dataclasses.replace(s, offload=_offload(s, opt, par))
    errors = [e for e in strategy_errors(c) if e.rule.startswith("offload.")]
    return errors[0] if errors else ""


def _offload(s: StrategyConfig, opt: str, par: str) -> OffloadConfig:
    """The tiers (opt, par) with the user's other offload keys (directory, step mode)."""
    return dataclasses.replace(s.offload, optimizer=opt, params=par)


def _get(s: StrategyConfig, key: str):
    obj = s
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj
