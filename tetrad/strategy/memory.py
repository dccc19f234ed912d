"""Memory per rank of a candidate, term by term, on the pipeline stage that needs the most.

Model states follow ZeRO (Rajbhandari et al.) over the gradient group of N = dp*cp*sp ranks (stages
2-3 keep full gradients while accumulating micro-batches: see state_bytes; under breadth-first
those of one chunk at a time, each chunk's reduced after its last backward), with
P bytes per compute parameter, G per gradient and K of optimizer state per parameter
(mixed precision: P = G = 2, K = 12 = fp32 master + two Adam moments; fp32: P = G = 4, K = 8):
stage 0 (P+G+K)Ψ, stage 1 (P+G)Ψ + KΨ/N, stage 2 PΨ + (G+K)Ψ/N, stage 3 (P+G+K)Ψ/N — which is
16Ψ, 4Ψ+12Ψ/N, 2Ψ+14Ψ/N and 16Ψ/N for mixed precision, as in the paper. A framework keeping
fp32 gradients (``costs.grad_elem`` 4) has G = 4; ``optimizer.state_dtype: bf16`` stores the
two moments in 2 bytes each (K = 4 in fp32, 8 mixed). Offloading the optimizer moves the K
part to the host (cpu) or the nvme tier; offloading parameters (stage 3) moves the P part
likewise; what an nvme tier holds rests in host memory and files as ``host_memory_gb`` places
it (``tetrad.strategy.offload_cost``: fp32 parameters share the master files, gradients go to
the tier at stages 2-3 unless the step overlaps backward).

Activations: one layer's saved bytes for one micro-batch (measured, or the spec's inventory,
``tetrad.strategy.layer_ops``), times the stage's layers, times its micro-batches in flight:
the first stage holds min(p, m) under 1F1B, ZB-H1 and ZB-V (ZB-V's 2p half-stage chunks hold
the same on every rank), m under GPipe and breadth-first (every micro-batch of every chunk
before the first backward), p + (p-1)/v chunks' worth interleaved (Korthikanti et al.); the
last stage holds 1 (interleaved: ((v-1)p + 1)/v). A recomputing policy adds one layer's
un-recomputed activations: the working set of the backward of the layer being recomputed.
Context parallelism divides every term by cp: a rank holds s/cp tokens everywhere, and ring
attention keeps q, k, v, the output and its log-sum-exp of those tokens only (no s x s
scores), like a flash kernel.

Hybrid sharding shards over N = dp_shard x cp x sp instead; hpZ adds its secondary shards
(P Ψ / (hpz x cp x sp), on the device whatever the offload tiers), qwZ and qgZ their quantized
buffers (``tetrad.strategy.sharding``).

Buffers: the loss's logits on the stage holding the head (the last; under ZB-V the first
rank holds both ends) (``costs.loss_bytes_per_logit`` per logit of one micro-batch: tetrad's
fp32 log-softmax and its gradients, see tetrad.strategy.software), the ZeRO-3 gathered units
(the computing one plus ``zero3_prefetch`` ahead, or under breadth-first the chunk being run,
and one unit's gradient) or one gradient
bucket (stages 0-2), pipeline send/recv buffers, and under cp the ring's K/V blocks (the one
in use and the one arriving) and, in backward, their fp32 dK/dV accumulators.

On an accelerator the caching allocator reserves more than it hands out: ``fragmentation``
(fitted to published peak memory, hardware/calibration.yaml) of the allocator's peak; NCCL's
own buffers sit outside it, ``nccl_bytes_per_group`` for each process group the layout uses.
"""

from __future__ import annotations

import math

from tetrad.config.schema import StrategyConfig
from tetrad.models.args import ModelArgs
from tetrad.models.counts import activation_bytes as layer_activation_bytes
from tetrad.strategy.offload_cost import placement
from tetrad.strategy.shapes import holds_chunk_runs, layers_per_stage, micro_batches, param_counts, shard_group
from tetrad.strategy.sharding import extra_buffer_bytes, secondary_bytes


def state_bytes(psi: float, zero: int, n: int, precision: str, m: int = 1,
                grad_elem: int | None = None, state_dtype: str = "fp32") -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer state per rank, before offload.

    tetrad's stages 2-3 accumulate full-size gradients locally over the micro-batches of a
    step and reduce-scatter once at the end (tetrad.zero.grads), so with m > 1 micro-batches
    their gradients are not sharded in memory.
    """
    p = 4 if precision == "fp32" else 2
    g = grad_elem or p
    k = (8 if precision == "fp32" else 12) - (4 if state_dtype == "bf16" else 0)  # bf16 moments: 2+2
    shard = {0: (1, 1, 1), 1: (1, 1, n), 2: (1, n, n), 3: (n, n, n)}[zero]
    if zero >= 2 and m > 1:
        shard = (shard[0], 1, shard[2])
    return {"params": p * psi / shard[0], "grads": g * psi / shard[1], "optimizer": k * psi / shard[2]}


def in_flight(s: StrategyConfig, m: int, stage: str = "first") -> float:
    """Micro-batches of a stage's layers whose activations the stage holds at its peak."""
    p, v = s.pp, s.virtual_stages
    if p == 1:
        return 1.0
    if s.pipeline_schedule in ("gpipe", "breadth_first"):
        return float(m)
    if stage == "last" and s.pipeline_schedule != "zero_bubble_v":  # ZB-V: the same on every rank
        return min(float(m), ((v - 1) * p + 1) / v) if s.pipeline_schedule == "interleaved" else 1.0
    base = float(min(p, m))
    if s.pipeline_schedule == "interleaved":
        return base * (1 + (p - 1) / (p * v))
    return base


def msp_ratio(a: ModelArgs, s: StrategyConfig, costs) -> float:
    """Megatron-SP's activation saving, from the formulas (measured bytes are without it)."""
    if not (s.megatron_sp and s.tp > 1):
        return 1.0
    seq = a.seq_len / (s.sp * s.cp)
    with_sp = layer_activation_bytes(seq, 1, a.d_model, a.n_heads, t=s.tp, policy=s.recompute, megatron_sp=True)
    return with_sp / layer_activation_bytes(seq, 1, a.d_model, a.n_heads, t=s.tp, policy=s.recompute)


def layer_bytes(a: ModelArgs, s: StrategyConfig, costs, policy: str) -> float:
    """One layer's activations for one micro-batch under ``policy`` (its s/cp tokens under cp)."""
    exact = getattr(costs, "layer_activation_bytes", None)
    if exact is not None:
        return exact(s.tp, s.sp, s.micro_batch_size, policy, s.megatron_sp and s.tp > 1) / s.cp
    return costs.act_bytes(s.tp, s.sp, s.micro_batch_size, policy) * msp_ratio(a, s, costs) / s.cp


def activation_bytes(a: ModelArgs, s: StrategyConfig, costs, m: int, stage: str = "first") -> float:
    total = layers_per_stage(a, s) * layer_bytes(a, s, costs, s.recompute) * in_flight(s, m, stage)
    if s.recompute != "none" and s.recompute != "selective":
        total += layer_bytes(a, s, costs, "none")
    return total


def loss_bytes(a: ModelArgs, s: StrategyConfig, costs) -> float:
    """The loss's buffers over one micro-batch's logits (on the stage holding the head)."""
    tokens = s.micro_batch_size * a.seq_len / (s.sp * s.cp)
    return getattr(costs, "loss_bytes_per_logit", 8.0) * tokens * a.vocab_size / s.tp


def ring_buffer_bytes(a: ModelArgs, s: StrategyConfig, elem: int) -> float:
    """Ring attention's working buffers on one rank (0 without cp): two K/V blocks of the
    cp-local sequence for this rank's heads, and in backward two fp32 dK/dV accumulators."""
    if s.cp == 1:
        return 0.0
    kv = 2 * s.micro_batch_size * a.seq_len / s.cp * a.n_kv_heads / (s.tp * s.sp) * a.head_dim
    return 2 * kv * elem + 2 * kv * 4


def comm_bytes(a: ModelArgs, s: StrategyConfig, costs, elem: int) -> float:
    """ZeRO-3's gathered units and one unit's gradient, or one gradient bucket; p2p buffers;
    ring attention's K/V blocks."""
    if s.zero == 3:
        unit = param_counts(a).layer / s.tp
        depth = 1 + getattr(costs, "zero3_prefetch", 1)
        if holds_chunk_runs(s):  # breadth-first holds a whole chunk gathered for its run
            depth = max(depth, math.ceil(layers_per_stage(a, s) / s.virtual_stages))
        comm = depth * unit * getattr(costs, "gather_elem", elem) + unit * getattr(costs, "grad_reduce_elem", elem)
        comm += extra_buffer_bytes(s, unit, elem)
    else:
        comm = s.bucket_mb * 2**20
    tokens = s.micro_batch_size * a.seq_len / (s.sp * s.cp)
    p2p = 2 * tokens * a.d_model * elem * s.chunks_per_rank if s.pp > 1 else 0.0
    return comm + p2p + ring_buffer_bytes(a, s, elem)


def holds_head(s: StrategyConfig, stage: str) -> bool:
    """Whether the rank of ``stage`` ('first' / 'last') holds the output layer and loss: the
    last stage, or under ZB-V the first rank (its V turns back to it)."""
    if s.pp == 1:
        return True
    return stage == ("first" if s.pipeline_schedule == "zero_bubble_v" else "last")


def stage_params(a: ModelArgs, s: StrategyConfig, stage: str) -> float:
    """Parameters on a rank of the first or last pipeline stage (both ends when pp = 1, and on
    the first rank under ZB-V)."""
    c = param_counts(a)
    if s.pp == 1 or (s.pipeline_schedule == "zero_bubble_v" and stage == "first"):
        edge = c.embed + c.head
    elif s.pipeline_schedule == "zero_bubble_v":
        edge = 0
    else:
        edge = c.embed if stage == "first" else c.head
    return (layers_per_stage(a, s) * c.layer + edge) / s.tp


def process_groups(s: StrategyConfig, world: int) -> int:
    zpp = [s.zeropp.hpz, 2 if s.zeropp.quantize_grads else 1, 1 if s.dp_shard == "auto" else 2]
    return sum(1 for g in (s.tp, s.pp, s.sp, s.cp, shard_group(s, world), *zpp) if g > 1)


def stage_terms(a: ModelArgs, s: StrategyConfig, costs, world: int, m: int, precision: str,
                stage: str, state_dtype: str = "fp32") -> dict[str, float]:
    """Every term of one stage's memory (bytes on the device unless its name says host/disk).
    What an nvme tier holds rests in host memory and files as ``host_memory_gb`` places it
    (tetrad.strategy.offload_cost)."""
    elem = 4 if precision == "fp32" else 2
    accumulate = 1 if getattr(costs, "reduce_every_micro_batch", False) else m
    psi = stage_params(a, s, stage)
    states = state_bytes(psi, s.zero, shard_group(s, world), precision, accumulate,
                         getattr(costs, "grad_elem", None), state_dtype)
    if holds_chunk_runs(s) and s.zero >= 2 and accumulate > 1 and not s.offload.active:
        # breadth-first reduces a chunk's gradients after its last backward (the runner's
        # ChunkResidency): full gradients of one chunk at a time, the rest sharded
        sharded = state_bytes(psi, s.zero, shard_group(s, world), precision, 1,
                              getattr(costs, "grad_elem", None), state_dtype)["grads"]
        states["grads"] = states["grads"] / s.virtual_stages + sharded
    terms = {"params": 0.0, "grads": states["grads"], "optimizer": 0.0, "host": 0.0, "disk": 0.0}
    for part, tier in (("optimizer", s.offload.optimizer), ("params", s.offload.params)):
        if tier != "nvme":
            terms[{"none": part, "cpu": "host"}[tier]] += states[part]
    if "nvme" in (s.offload.optimizer, s.offload.params):
        shard = psi / (shard_group(s, world) if s.zero else 1)
        placed = placement(s, costs, shard, precision, state_dtype, m)
        terms["host"] += placed["host"]
        terms["disk"] += placed["disk"]
    terms["params"] += secondary_bytes(s, psi, elem)  # hpZ: on the device
    terms["activations"] = activation_bytes(a, s, costs, m, stage)
    terms["loss"] = loss_bytes(a, s, costs) if holds_head(s, stage) else 0.0
    terms["comm_buffers"] = comm_bytes(a, s, costs, elem)
    allocated = sum(v for k, v in terms.items() if k not in ("host", "disk"))
    terms["fragmentation"] = getattr(costs, "fragmentation", 0.0) * allocated
    terms["nccl"] = getattr(costs, "nccl_bytes_per_group", 0.0) * process_groups(s, world)
    return terms


DEVICE_TERMS = ("params", "grads", "optimizer", "activations", "loss", "comm_buffers", "fragmentation",
                "nccl")


def per_rank(a: ModelArgs, s: StrategyConfig, costs, world: int, global_batch: int,
             precision: str, state_dtype: str = "fp32") -> dict[str, float]:
    """{'device': bytes on the accelerator, 'host': offloaded to host RAM, 'disk': to NVMe,
    'allocator': what the framework's allocator reserves (comparable with torch's peak
    reserved memory), the parts, and 'stage': which pipeline stage peaks}, for the stage
    that needs the most. On a CPU-only machine host and device are one pool (see search)."""
    m = micro_batches(global_batch, s, world)
    stages = ("first", "last") if s.pp > 1 else ("only",)
    best = None
    for stage in stages:
        terms = stage_terms(a, s, costs, world, m, precision, "last" if stage == "only" else stage,
                            state_dtype)
        device = sum(terms[k] for k in DEVICE_TERMS)
        if best is None or device > best[0]:
            best = (device, stage, terms)
    device, stage, terms = best
    return {"device": device, "host": terms["host"], "disk": terms["disk"],
            "allocator": device - terms["nccl"],
            "states": terms["params"] + terms["grads"] + terms["optimizer"] + terms["host"] + terms["disk"],
            "activations": terms["activations"],
            "buffers": terms["loss"] + terms["comm_buffers"] + terms["fragmentation"] + terms["nccl"],
            "stage": stage, "terms": terms}
