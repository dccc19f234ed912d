"""The rule book's sharding-across-nodes rules: hybrid sharding (``strategy.dp_shard``) and
ZeRO++ (``strategy.zeropp``: hpZ, qwZ, qgZ), alone and against the world and its nodes.

Part of the rule book (``tetrad.config.validate`` calls them: ``zeropp_errors`` among the
strategy's own rules, ``sharding_errors`` among those against a world size), so the engine,
config validation and the planner's search ask the same question.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tetrad.config.problem import Problem, divisors, rules

if TYPE_CHECKING:
    from tetrad.config.schema import StrategyConfig


def zeropp_errors(s: StrategyConfig) -> list[Problem]:
    """ZeRO++ against the ZeRO stage."""
    z = s.zeropp
    return rules([
        ("zeropp.hpz_zero3", z.hpz > 1 and s.zero != 3,
         f"strategy.zeropp.hpz={z.hpz} needs strategy.zero=3 (got zero={s.zero}): hpZ keeps a secondary "
         "copy of stage-3 parameter shards; valid: zero 3, or hpz 1"),
        ("zeropp.qwz_zero3", z.quantize_weights and s.zero != 3,
         f"strategy.zeropp.quantize_weights=true needs strategy.zero=3 (got zero={s.zero}): it quantizes "
         "stage 3's parameter all-gathers; valid: zero 3, or quantize_weights false"),
        ("zeropp.qgz_zero", z.quantize_grads and s.zero < 2,
         f"strategy.zeropp.quantize_grads=true needs strategy.zero 2 or 3 (got zero={s.zero}): it replaces "
         "the gradient reduce-scatter; valid: zero 2/3, or quantize_grads false"),
    ])


def sharding_errors(s: StrategyConfig, dp: int, world: int, rpn: int | None) -> list[Problem]:
    """dp_shard and hpz against dp; qgZ's hierarchy against the nodes."""
    shard = dp if s.dp_shard == "auto" else s.dp_shard
    hpz = s.zeropp.hpz
    errors = rules([
        ("world.dp_shard", dp % shard != 0,
         f"strategy.dp_shard={shard} does not divide dp={dp}; valid dp_shard: {divisors(dp)} or 'auto'"),
        ("zero.dp_shard_stage", shard < dp and s.zero == 0,
         f"strategy.dp_shard={shard} < dp={dp} needs strategy.zero 1, 2 or 3 (got 0): plain data "
         "parallelism shards nothing; valid: zero >= 1, or dp_shard 'auto'"),
        ("zeropp.hpz_divides", hpz > 1 and shard % hpz != 0,
         f"strategy.zeropp.hpz={hpz} does not divide the ZeRO shard group of dp_shard={shard} dp ranks; "
         f"valid hpz: {divisors(shard)}"),
        ("world.ranks_per_node", rpn is not None and world > rpn and world % rpn != 0,
         f"ranks_per_node={rpn} does not divide world_size={world}: every node must run the same number "
         f"of ranks; valid: {divisors(world)}, or at least the world size (one node)"),
    ])
    if errors or rpn is None or not s.zeropp.quantize_grads:
        return errors
    return rules([("zeropp.qgz_nodes", not _members_per_node(s, shard, dp, rpn),
                    f"strategy.zeropp.quantize_grads=true needs each ZeRO shard group (dp_shard={shard} x "
                    f"cp={s.cp} x sp={s.sp} ranks, {s.tp} apart) to have the same number of members on every node, but "
                    f"ranks_per_node={rpn} splits it unevenly (the hierarchical all-to-all pairs the members "
                    f"of one node with those of every other); valid: quantize_grads false, or a layout "
                    f"whose group takes the same share of each node it touches (tp dividing ranks_per_node)")])


def _members_per_node(s: StrategyConfig, shard: int, dp: int, rpn: int) -> bool:
    """Whether every ZeRO shard group has the same number of members on each node it touches
    (it may differ between groups). Mesh order (pp, dp, cp, sp, tp): a group's ranks are
    ``start + i * tp`` for i < shard * cp * sp, one group per (stage, block of shard dp ranks,
    tp rank); the same enumeration as ``tetrad.parallel.nodes``, done on numbers only."""
    width, stage = shard * s.cp * s.sp, dp * s.cp * s.sp * s.tp
    for p in range(s.pp):
        for block in range(dp // shard):
            for t in range(s.tp):
                start = p * stage + block * width * s.tp + t
                nodes: dict[int, int] = {}
                for i in range(width):
                    node = (start + i * s.tp) // rpn
                    nodes[node] = nodes.get(node, 0) + 1
                if len(set(nodes.values())) != 1:
                    return False
    return True
