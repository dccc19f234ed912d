"""Memory per rank of a candidate: model states + activations + buffers.

Model states follow ZeRO (Rajbhandari et al.) over the gradient group of N = dp*cp*sp ranks (stages
2-3 keep full gradients while accumulating micro-batches: see state_bytes), with
P bytes per compute parameter, G per gradient and K of optimizer state per parameter
(mixed precision: P = G = 2, K = 12 = fp32 master + two Adam moments; fp32: P = G = 4, K = 8):
stage 0 (P+G+K)Ψ, stage 1 (P+G)Ψ + KΨ/N, stage 2 PΨ + (G+K)Ψ/N, stage 3 (P+G+K)Ψ/N — which is
16Ψ, 4Ψ+12Ψ/N, 2Ψ+14Ψ/N and 16Ψ/N for mixed precision, as in the paper.
Offloading the optimizer moves the K part to the host (cpu) or the drive (nvme); offloading
parameters (stage 3) moves the P part likewise.

Activations: the measured (or formula) bytes of one layer for one micro-batch, times the
layers on the rank, times the micro-batches in flight: 1 without a pipeline, m under GPipe and
breadth-first (every micro-batch of every chunk before the first backward), min(p, m) under
1F1B, ZB-H1 and ZB-V (the first stage holds p micro-batches of L/p layers: L layers in total;
ZB-V's 2p half-stage chunks hold the same on every rank), times (1 + (p-1)/(p v)) for the
interleaved schedule (Korthikanti et al.); full recompute adds one layer's un-recomputed
activations as the working set of its backward. Context parallelism divides every term by cp:
a rank holds s/cp tokens everywhere, and ring attention keeps q, k, v, the output and its
log-sum-exp of those tokens only (no s x s scores), like a flash kernel.
Buffers: fp32 logits and their gradient on the last stage, one gradient bucket in flight
(stages 0-2) or two gathered layers (stage 3, current + prefetch), pipeline send/recv buffers,
and under cp the ring's K/V blocks (the one in use and the one arriving) and, in backward,
their fp32 dK/dV accumulators.
"""

from __future__ import annotations

from tetrad.config.schema import StrategyConfig
from tetrad.models.args import ModelArgs
from tetrad.models.counts import activation_bytes as layer_activation_bytes
from tetrad.strategy.shapes import layers_per_stage, micro_batches, param_counts, rank_params, shard_group


def state_bytes(psi: float, zero: int, n: int, precision: str, m: int = 1) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer state per rank, before offload.

    tetrad's stages 2-3 accumulate full-size gradients locally over the micro-batches of a
    step and reduce-scatter once at the end (tetrad.zero.grads), so with m > 1 micro-batches
    their gradients are not sharded in memory.
    """
    p = g = 4 if precision == "fp32" else 2
    k = 8 if precision == "fp32" else 12
    shard = {0: (1, 1, 1), 1: (1, 1, n), 2: (1, n, n), 3: (n, n, n)}[zero]
    if zero >= 2 and m > 1:
        shard = (shard[0], 1, shard[2])
    return {"params": p * psi / shard[0], "grads": g * psi / shard[1], "optimizer": k * psi / shard[2]}


def in_flight(s: StrategyConfig, m: int) -> float:
    p = s.pp
    if p == 1:
        return 1.0
    if s.pipeline_schedule in ("gpipe", "breadth_first"):
        return float(m)
    base = float(min(p, m))
    if s.pipeline_schedule == "interleaved":
        return base * (1 + (p - 1) / (p * s.virtual_stages))
    return base


def msp_ratio(a: ModelArgs, s: StrategyConfig, costs) -> float:
    """Megatron-SP's activation saving, from the formulas (measured bytes are without it)."""
    if not (s.megatron_sp and s.tp > 1):
        return 1.0
    seq = a.seq_len / (s.sp * s.cp)
    with_sp = layer_activation_bytes(seq, 1, a.d_model, a.n_heads, t=s.tp, policy=s.recompute, megatron_sp=True)
    return with_sp / layer_activation_bytes(seq, 1, a.d_model, a.n_heads, t=s.tp, policy=s.recompute)


def activation_bytes(a: ModelArgs, s: StrategyConfig, costs, m: int) -> float:
    per_layer = costs.act_bytes(s.tp, s.sp, s.micro_batch_size, s.recompute) * msp_ratio(a, s, costs) / s.cp
    total = layers_per_stage(a, s) * per_layer * in_flight(s, m)
    if s.recompute == "full":
        total += costs.act_bytes(s.tp, s.sp, s.micro_batch_size, "none") / s.cp
    return total


def ring_buffer_bytes(a: ModelArgs, s: StrategyConfig, elem: int) -> float:
    """Ring attention's working buffers on one rank (0 without cp): two K/V blocks of the
    cp-local sequence for this rank's heads, and in backward two fp32 dK/dV accumulators."""
    if s.cp == 1:
        return 0.0
    kv = 2 * s.micro_batch_size * a.seq_len / s.cp * a.n_kv_heads / (s.tp * s.sp) * a.head_dim
    return 2 * kv * elem + 2 * kv * 4


def buffer_bytes(a: ModelArgs, s: StrategyConfig, elem: int) -> float:
    tokens = s.micro_batch_size * a.seq_len / (s.sp * s.cp)
    logits = 2 * 4 * tokens * a.vocab_size / s.tp
    if s.zero == 3:
        comm = 2 * param_counts(a).layer / s.tp * elem
    else:
        comm = s.bucket_mb * 2**20
    p2p = 2 * tokens * a.d_model * elem * s.chunks_per_rank if s.pp > 1 else 0.0
    return logits + comm + p2p + ring_buffer_bytes(a, s, elem)


def per_rank(a: ModelArgs, s: StrategyConfig, costs, world: int, global_batch: int,
             precision: str) -> dict[str, float]:
    """{'device': bytes on the accelerator, 'host': bytes offloaded to host RAM, 'disk': to
    NVMe, and the parts}. On a CPU-only machine host and device are one pool (see search)."""
    n = shard_group(s, world)
    m = micro_batches(global_batch, s, world)
    states = state_bytes(rank_params(a, s), s.zero, n, precision, m)
    host = disk = 0.0
    for part, tier in (("optimizer", s.offload.optimizer), ("params", s.offload.params)):
        if tier == "cpu":
            host += states[part]
        elif tier == "nvme":
            disk += states[part]
    on_device = states["grads"] + sum(states[part] for part in ("optimizer", "params")
                                      if getattr(s.offload, part) == "none")
    acts = activation_bytes(a, s, costs, m)
    buffers = buffer_bytes(a, s, 4 if precision == "fp32" else 2)
    return {"device": on_device + acts + buffers, "host": host, "disk": disk,
            "states": sum(states.values()), "activations": acts, "buffers": buffers}
