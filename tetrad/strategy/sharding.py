"""Pricing ZeRO's collectives under hybrid sharding and ZeRO++ (hpZ, qwZ, qgZ), one call each.

What tetrad.zero issues (``tetrad.zero.grads``, ``stage3``, ``zeropp``), per flat group of x
elements on a ZeRO shard group of n = dp_shard x sp ranks (tp apart), R = dp / dp_shard
replicas:

* gradients: a reduce-scatter over n (stage 0: an all-reduce); with qgZ instead ZeRO++'s
  hierarchical all-to-all: k = the shard group's members per node, the first all-to-all of
  the whole bucket in int8 over the k node members (intra-node), the second of 1/k of it over
  the n/k nodes (one member per node, so each rank's own NIC share), plus the quantize and
  dequantize passes over HBM; then, with replicas, an all-reduce of the x/n shard over R ranks
  n x tp apart (across nodes);
* stage-3 gathers: forward from the primary shards over n, in int8 with qwZ (1 + 4/256
  bytes per element, plus the passes over HBM); backward the same, or with hpZ from the
  secondary shards over hpz x sp ranks (inside the node) in the compute dtype.

Memory: hpZ keeps ``params / (hpz x sp)`` compute-dtype elements more per rank; qwZ a
quantized copy of the gathered unit beside it; qgZ an fp32 copy of the bucket being reduced
and its int8 form (``extra_buffer_bytes``).
"""

from __future__ import annotations

from tetrad.config.schema import StrategyConfig
from tetrad.strategy.hardware import members_per_node
from tetrad.strategy.shapes import replicas, shard_group

QUANT_BYTES = 1 + 4 / 256  # int8 values plus one fp32 scale per 256-element block


def _quantize_s(costs, elems: float, elem: int) -> float:
    """Quantize (read elem, write 1 byte) and dequantize (read 1, write elem) passes over HBM."""
    price = getattr(costs, "quantize", None)
    return price(elems, elem) if price is not None else 0.0


def node_members(costs, g: int, stride: int) -> int:
    """How many of a group's g members (stride apart) share a node, by the costs' node size."""
    rpn = getattr(costs, "ranks_per_node", None)
    return g if rpn is None else members_per_node(g, stride, rpn)


def reduce_time(s: StrategyConfig, costs, world: int, elems: float, g_elem: float) -> float:
    """One flat group's gradient reduction: reduce-scatter (or qgZ), then the replicas."""
    n, stride = shard_group(s, world), s.tp
    if s.zero == 0:
        return costs.coll("all_reduce", n, stride, elems * g_elem)
    if s.zeropp.quantize_grads:
        k = node_members(costs, n, stride)
        t = costs.coll("all_to_all", k, stride, elems * QUANT_BYTES)
        t += costs.coll("all_to_all", n // k, stride * k, elems / k * QUANT_BYTES)
        t += _quantize_s(costs, elems, 4) + _quantize_s(costs, elems / k, 4)
    else:
        t = costs.coll("reduce_scatter", n, stride, elems * g_elem)
    r = replicas(s, world)
    if r > 1:
        t += costs.coll("all_reduce", r, n * stride, elems / n * g_elem)
    return t


def gather_times(s: StrategyConfig, costs, world: int, elems: float, p_elem: float) -> tuple[float, float]:
    """(forward, backward) seconds of one stage-3 unit's all-gather."""
    n, stride, z = shard_group(s, world), s.tp, s.zeropp
    if z.quantize_weights:
        fwd = costs.coll("all_gather", n, stride, elems * QUANT_BYTES) + _quantize_s(costs, elems, p_elem)
    else:
        fwd = costs.coll("all_gather", n, stride, elems * p_elem)
    bwd = costs.coll("all_gather", z.hpz * s.cp * s.sp, stride, elems * p_elem) if z.hpz > 1 else fwd
    return fwd, bwd


def secondary_bytes(s: StrategyConfig, params: float, elem: int) -> float:
    """hpZ's secondary shards on a rank holding ``params`` (unsharded count) of the model."""
    return params * elem / (s.zeropp.hpz * s.cp * s.sp) if s.zero == 3 and s.zeropp.hpz > 1 else 0.0


def extra_buffer_bytes(s: StrategyConfig, unit: float, elem: int) -> float:
    """qwZ's quantized gathered unit; qgZ's fp32 bucket and its int8 send and receive buffers."""
    out = unit * QUANT_BYTES if s.zeropp.quantize_weights else 0.0
    if s.zeropp.quantize_grads:
        out += unit * (4 + 2 * QUANT_BYTES)
    return out
