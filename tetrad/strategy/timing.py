"""Step time of a candidate: compute + exposed communication + pipeline bubble + optimizer + I/O.

What the model assumes (Narayanan et al., Korthikanti et al., Qi et al., Rajbhandari et al.):

* Per micro-batch the busiest pipeline rank runs ceil(L/p) layers plus the embedding and loss
  head (the head is on the last stage; pricing it on the busiest one is conservative).
* Tensor parallelism: per layer 2 all-reduces of the b*s*h activations in forward and 2 in
  backward, 2 more when full recompute re-runs the forward; Megatron-SP replaces each by an
  all-gather + reduce-scatter pair of the same volume, and its backward re-gathers each
  column-parallel projection's input (3 + 2 per Llama layer) and all-reduces each norm's
  weight gradient; the vocab-parallel embedding and head add 2 more, the vocab-parallel loss
  2 small ones. All exposed (each sits between two dependent matmuls). See ``_tp_comm``.
* Ulysses: per layer all-to-alls of q, k, v and the output in forward, the same in backward and
  again under full recompute (selective recompute keeps the core's inputs); exposed.
* Context parallelism (ring attention): a rank's layer work is the whole sequence's over cp
  (its s/cp tokens through the matmuls; its queries against every key in attention, which the
  zigzag load balance spreads evenly). Per layer each rank passes K/V blocks cp-1 hops in
  forward, and in backward cp-1 K/V hops plus cp hops of the fp32 dK/dV accumulators; a hop
  hides behind one block of attention (the core's time / cp) as far as the machine overlaps,
  the rest is exposed. cp_load_balance off is priced like on (only the default is searched).
* Pipeline: GPipe and 1F1B add (p-1) micro-batch times of bubble, interleaved and breadth-first
  (p-1)/v, ZB-H1 (p-1)(T_F + T_B - T_W) with T_W the weight-gradient share of backward (24h /
  (48h + 8s) of a no-recompute backward), ZB-V (p-1)(T_F + T_B - T_W)/2: what tetrad's
  list-scheduled ZB-V gives on the cost model at T_F = T_B = T_W (Qi et al.'s hand-made one
  reaches ~0 in the steady state; tests/test_pipeline_schedules.py checks the simulator against
  this); every micro-batch sends activations forward and gradients back (b*s*h elements; /t
  with Megatron-SP), once per chunk of the rank (v times interleaved / breadth-first, twice
  ZB-V), exposed.
  The bubble is the time the busiest rank waits while other stages fill and drain the
  pipeline; in those phases on average half the stages compute (1 of p up to p-1 of p), so
  where ranks share cores the busy ones run faster than in the all-busy steady state: the
  bubble is scaled by the costs' ``busy_factor(1/2)`` (1 on accelerators, which never share).
* Data parallelism syncs gradients once per step, during the last micro-batch's backward,
  one collective per flat bucket (stage 3: per unit), each paying its alpha: all of it but
  the last bucket can hide behind that backward, as far as the machine lets communication
  overlap compute (the profile's measured overlap fraction; 1 on GPUs). Stage 0 all-reduces;
  stages 1-2 reduce-scatter then all-gather updated parameters after the step (exposed);
  stage 3 all-gathers each unit (each block, the embedding, the final norm, the head) before
  its forward and its backward in every micro-batch, prefetching one ahead: the first gather
  of each pass waits, the rest hide behind compute as far as overlap allows; under looped
  breadth-first once per chunk run instead (a chunk's m forwards, its m backwards), 2v-1 runs
  a step (``dp_time``).
* Per micro-batch the engine also pays for what lies between the layers (module and autograd
  Python overhead, gradient accumulation and hooks, loss glue): the profile's whole-model
  micro-batch minus its layers and head (``costs.micro_batch_overhead``; 0 for cluster specs,
  whose kernels are priced from FLOPs and whose host overhead hides behind asynchronous
  launches).
* Per-step synchronisation (tetrad.engine): the loss is all-reduced over the gradient
  group (dp x cp x sp), the gradient norm's squares over the dp group (ZeRO >= 1), the tp group and
  the pp group, and the last stage broadcasts the loss to its pp group: one small-message
  latency (the alpha of the fit) each, exposed (each waits for the slowest rank).
* Optimizer: AdamW over the rank's shard (on the host when offloaded; bf16 moments cost the
  compiled stochastic-rounding kernel's time); offload moves gradients down and parameters up
  over host-device bandwidth. NVMe (``offload_io``, tetrad.strategy.offload_cost): what the
  placement leaves in files is read and written at the disk's bandwidth; parameter reads and
  gradient writes overlap forward and backward, the state stream is exposed under
  ``offload.step: sync`` and shares the disk beside compute under ``overlap``/``delayed``.
"""

from __future__ import annotations

from tetrad.config.schema import StrategyConfig
from tetrad.models.args import ModelArgs
from tetrad.strategy.offload_cost import PIECE_ELEMS, placement
from tetrad.strategy.shapes import (dp_degree, grad_group, holds_chunk_runs, layers_per_stage, micro_batches,
                                   param_counts, rank_params, replicas, shard_group)
from tetrad.strategy.sharding import gather_times, reduce_time


def _tp_comm(a: ModelArgs, s: StrategyConfig, costs, n_act: float, elem: int) -> tuple[float, float]:
    """(forward, backward) exposed tensor-parallel seconds per micro-batch on one rank.

    Counted from what tetrad.parallel issues (tensor.py, comm.py, sequence.py), one collective
    at a time, each paying its fit's alpha:

    * plain tp: per layer the attention and the MLP each all-reduce their output in forward
      (``reduce_from_region``) and their input gradient in backward (``copy_to_region``); the
      vocab-parallel embedding all-reduces in forward and the head's input copy in backward;
    * Megatron-SP: each all-reduce becomes an all-gather (region entry) + reduce-scatter
      (exit) of the full-sequence activation, in forward and again in backward; in backward
      each column-parallel projection re-gathers its input from the saved sequence shard
      (``_ShardSavingLinear``): q, k, v (3) and the MLP's input projections (gate and up: 2;
      1 for a plain MLP) per layer, and the head's projection once; and every replicated norm
      (2 per layer, the final one) all-reduces its weight gradient over tp in backward
      (``SequenceParallelReplicated``: d elements each);
    * the vocab-parallel cross-entropy all-reduces twice in forward (the max, then the
      sum-exp and target logit together), nothing in backward.
    """
    if s.tp == 1:
        return 0.0, 0.0
    layers = layers_per_stage(a, s)
    re_forward = 2 * layers if s.recompute == "full" else 0
    if s.megatron_sp:
        ag, rs = costs.coll("all_gather", s.tp, 1, n_act), costs.coll("reduce_scatter", s.tp, 1, n_act)
        one = ag + rs
        in_projs = 3 + (2 if a.arch == "llama" else 1)
        extra_bwd = (in_projs * layers + 1) * ag + (2 * layers + 1) * costs.coll("all_reduce", s.tp, 1,
                                                                                   a.d_model * elem)
    else:
        one, extra_bwd = costs.coll("all_reduce", s.tp, 1, n_act), 0.0
    fwd = (2 * layers + 1) * one
    bwd = (2 * layers + 1 + re_forward) * one + extra_bwd
    tokens = s.micro_batch_size * a.seq_len / (s.sp * s.cp)
    ce = 2 * costs.coll("all_reduce", s.tp, 1, 4 * tokens)  # max; sum-exp with the target logit
    return fwd + ce, bwd


def _sp_comm(a: ModelArgs, s: StrategyConfig, costs, elem: int) -> tuple[float, float]:
    """Ulysses (tetrad.parallel.sequence.UlyssesAttention): per layer 4 all-to-alls in forward
    (q, k, v to head shards, the output back to sequence shards) and the reverse 4 in
    backward; a full-recompute backward re-runs the forward's 4."""
    if s.sp == 1:
        return 0.0, 0.0
    tokens = s.micro_batch_size * a.seq_len / (s.sp * s.cp)
    q = tokens * a.n_heads / s.tp * a.head_dim * elem
    kv = tokens * a.n_kv_heads / s.tp * a.head_dim * elem
    one = 2 * costs.coll("all_to_all", s.sp, s.tp, q) + 2 * costs.coll("all_to_all", s.sp, s.tp, kv)
    layers = layers_per_stage(a, s)
    return layers * one, layers * one * (2 if s.recompute == "full" else 1)


def _cp_comm(a: ModelArgs, s: StrategyConfig, costs, elem: int, core_f: float) -> tuple[float, float]:
    """Ring attention's exposed p2p per micro-batch (tetrad.parallel.context): per layer cp-1
    K/V hops in forward, cp-1 K/V hops and cp fp32 dK/dV hops in backward, each hidden
    behind one block of attention as far as the machine overlaps communication with compute:
    a rank's s/cp queries against all s keys cost ``core_f`` / cp over cp steps, so one block
    is ``core_f`` / cp^2 forward and twice that backward (``core_f``: the whole sequence's
    attention core, forward)."""
    if s.cp == 1:
        return 0.0, 0.0
    kv = 2 * s.micro_batch_size * a.seq_len / s.cp * a.n_kv_heads / (s.tp * s.sp) * a.head_dim
    stride = s.tp * s.sp
    hop, grad_hop = costs.coll("send_recv", 2, stride, kv * elem), costs.coll("send_recv", 2, stride, kv * 4)
    block = core_f / s.cp ** 2
    fwd = (s.cp - 1) * _hidden(hop, block, costs.overlap)
    bwd = (s.cp - 1) * _hidden(hop, 2 * block, costs.overlap) + s.cp * _hidden(grad_hop, 2 * block, costs.overlap)
    layers = layers_per_stage(a, s)
    return layers * fwd, layers * bwd * (2 if s.recompute == "full" else 1)


def _core_share(a: ModelArgs) -> float:
    """The attention core's share of a layer's forward FLOPs (4 s h of 2 x weights + 4 s h per token)."""
    weights = a.d_model * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim + a.n_heads * a.head_dim * a.d_model
    weights += (3 if a.arch == "llama" else 2) * a.d_model * a.d_ff
    core = 4 * a.seq_len * a.n_heads * a.head_dim
    return core / (2 * weights + core)


def micro_batch_times(a: ModelArgs, s: StrategyConfig, costs, elem: int) -> dict[str, float]:
    """T_F, T_B (compute + exposed tp/sp/cp communication) and T_W of one micro-batch on the busiest rank."""
    b, layers, cp = s.micro_batch_size, layers_per_stage(a, s), s.cp
    msp = s.megatron_sp and s.tp > 1
    f_l, b_l = (t / cp for t in costs.layer(s.tp, s.sp, b, s.recompute, msp=msp))
    f_h, b_h = (t / cp for t in costs.head(s.tp, s.sp, b))
    n_act = b * a.seq_len / (s.sp * cp) * a.d_model * elem
    tp_f, tp_b = _tp_comm(a, s, costs, n_act, elem)
    sp_f, sp_b = _sp_comm(a, s, costs, elem)
    cp_f, cp_b = _cp_comm(a, s, costs, elem, _core_share(a) * costs.layer(s.tp, s.sp, b, "none", msp=msp)[0])
    sp_f, sp_b = sp_f + cp_f, sp_b + cp_b
    f_none = costs.layer(s.tp, s.sp, b, "none", msp=msp)[0] / cp
    w_share = 24 * a.d_model / (48 * a.d_model + 8 * a.seq_len)
    over = getattr(costs, "micro_batch_overhead", None)
    o_f, o_b = over(s.tp, s.sp * cp, b, layers / a.n_layers) if over else (0.0, 0.0)
    o_f = max(o_f, -(layers * f_l + f_h))  # a correction never makes compute negative
    o_b = max(o_b, -(layers * b_l + b_h))
    return {"T_F": layers * f_l + f_h + tp_f + sp_f + o_f, "T_B": layers * b_l + b_h + tp_b + sp_b + o_b,
            "T_W": w_share * 2 * f_none * layers, "comm": tp_f + tp_b + sp_f + sp_b,
            "overhead": o_f + o_b, "bwd_layers": layers * b_l}


def pipeline_time(s: StrategyConfig, mb: dict[str, float], m: int, costs=None) -> tuple[float, float]:
    """(compute time of the step, bubble part of it) for the schedule."""
    t_mb = mb["T_F"] + mb["T_B"]
    p = s.pp
    if p == 1:
        return m * t_mb, 0.0
    bubble = {"gpipe": (p - 1) * t_mb, "1f1b": (p - 1) * t_mb,
              "interleaved": (p - 1) * t_mb / s.virtual_stages,
              "breadth_first": (p - 1) * t_mb / s.virtual_stages,
              "zero_bubble": (p - 1) * max(0.0, t_mb - mb["T_W"]),
              "zero_bubble_v": (p - 1) * max(0.0, t_mb - mb["T_W"]) / 2}[s.pipeline_schedule]
    busy = getattr(costs, "busy_factor", None)
    if busy is not None:
        bubble *= busy(0.5)
    return m * t_mb + bubble, bubble


def sync_time(s: StrategyConfig, costs, world: int) -> float:
    """The step's small synchronising collectives (loss and gradient-norm reductions)."""
    t = costs.coll("all_reduce", grad_group(s, world), s.tp, 8)
    if s.zero:
        t += costs.coll("all_reduce", shard_group(s, world), s.tp, 8)
    t += costs.coll("all_reduce", s.tp, 1, 8)
    t += 2 * costs.coll("all_reduce", s.pp, s.tp * s.sp * s.cp * dp_degree(s, world), 8)
    return t


def _p2p(a: ModelArgs, s: StrategyConfig, costs, world: int, m: int, elem: int) -> float:
    if s.pp == 1:
        return 0.0
    n = s.micro_batch_size * a.seq_len / (s.sp * s.cp) * a.d_model * elem / (s.tp if s.megatron_sp else 1)
    stride = s.tp * s.sp * s.cp * dp_degree(s, world)
    return 2 * (m * s.chunks_per_rank + s.pp - 1) * costs.coll("send_recv", 2, stride, n)


def _hidden(comm: float, window: float, overlap: float) -> float:
    return comm - overlap * min(comm, window)


def _stage_units(a: ModelArgs, s: StrategyConfig) -> list[tuple[float, int]]:
    """(parameters, count) of the ZeRO-3 units on the busiest rank (tetrad.zero.units.find_units):
    one per transformer block, and each parameter-holding module outside the blocks its own
    unit (token embedding, final norm, output projection when untied); the busiest pipeline
    rank is charged the larger edge (the embedding's or the head's side). The first entry is
    the first unit of forward, the last the first of backward."""
    c = param_counts(a)
    norm = c.head - (0 if a.tie_embeddings else a.vocab_size * a.d_model)
    head_units = [norm] + ([] if a.tie_embeddings else [a.vocab_size * a.d_model])
    if s.pp == 1:
        first, last = [c.embed], head_units
    elif c.embed >= sum(head_units):
        first, last = [c.embed], []
    else:
        first, last = [], head_units
    units = [(n / s.tp, 1) for n in first] + [(c.layer / s.tp, layers_per_stage(a, s))]
    return units + [(n / s.tp, 1) for n in last]


def dp_time(a: ModelArgs, s: StrategyConfig, costs, world: int, m: int, mb: dict, elem: int) -> float:
    """Exposed data-parallel (ZeRO) communication per step.

    Gradients are reduced on the step's last micro-batch only (``begin_backward(sync=...)``),
    one collective per flat group (stages 0-2: buckets of ``bucket_mb``; stage 3: one per
    unit), each paying its alpha; all but the last hide behind that backward as far as the
    machine overlaps (the last waits; a framework that reduces after backward,
    ``costs.grad_overlap`` 0, hides nothing). Stages 1-2 all-gather the updated parameters
    after the optimizer (exposed). Stage 3 (tetrad.zero.stage3) gathers every unit before its
    forward and again before its backward in every micro-batch, or once per chunk run under
    breadth-first (``_gathers_exposed``). Element sizes: gradients are
    reduced in ``costs.grad_reduce_elem`` bytes and parameters gathered in
    ``costs.gather_elem`` (both the compute dtype's for tetrad). Hybrid sharding and ZeRO++
    change what each collective is (``tetrad.strategy.sharding``), not when it runs.
    """
    n = shard_group(s, world)
    if n == 1 and replicas(s, world) == 1:
        return 0.0
    stride = s.tp
    g_elem = getattr(costs, "grad_reduce_elem", elem)
    p_elem = getattr(costs, "gather_elem", elem)
    if s.zero == 3:
        sizes = [(u, k) for u, k in _stage_units(a, s)]
    else:
        grads = rank_params(a, s) * g_elem
        bucket = min(grads, s.bucket_mb * 2**20)
        full, rest = divmod(grads, bucket)
        sizes = [(bucket / g_elem, int(full))] + ([(rest / g_elem, 1)] if rest else [])
    total = sum(k * reduce_time(s, costs, world, x, g_elem) for x, k in sizes)
    last = reduce_time(s, costs, world, sizes[-1][0], g_elem)
    exposed = max(last, _hidden(total, mb["bwd_layers"], getattr(costs, "grad_overlap", costs.overlap)))
    if s.zero >= 2 and getattr(costs, "reduce_every_micro_batch", False):
        exposed *= m  # FSDP: every micro-batch's backward reduce-scatters its gradients
    if s.zero in (1, 2):
        exposed += costs.coll("all_gather", n, stride, rank_params(a, s) * elem)
    if s.zero == 3:
        gathers = [(gather_times(s, costs, world, x, p_elem), k) for x, k in sizes]
        exposed += _gathers_exposed(s, gathers, m, mb["T_F"] + mb["T_B"], costs.overlap)
    return exposed


def _gathers_exposed(s: StrategyConfig, gathers: list, m: int, t_mb: float, overlap: float) -> float:
    """Stage 3's exposed all-gathers per step, from each unit's ((forward, backward) seconds,
    count). Per pass (pp = 1 and every schedule but breadth-first): every unit before its
    forward and its backward in each of the m micro-batches, prefetching one ahead, so the
    first unit of each pass waits (forward starts at the first unit, backward at the last)
    and the rest hide behind that micro-batch's compute. Breadth-first (``holds_chunk_runs``):
    each chunk's units once for its run of m forwards and once for its run of m backwards,
    the rank's last chunk once for both (its runs are adjacent): 2v-1 runs per step, each
    prefetching one unit ahead during its first pass, so the first gather of each run waits
    and the rest hide behind those first passes, about one micro-batch's compute in all."""
    fwd = sum(f * k for (f, _), k in gathers)
    bwd = sum(b * k for (_, b), k in gathers)
    if holds_chunk_runs(s):
        v = s.virtual_stages
        first = v * gathers[0][0][0] + (v - 1) * gathers[-1][0][1]
        return first + _hidden(fwd + (v - 1) / v * bwd - first, t_mb, overlap)
    first = gathers[0][0][0] + gathers[-1][0][1]
    return m * (first + _hidden(fwd + bwd - first, t_mb, overlap))


def _copy(costs, kind: str, nbytes: float, chunk: float) -> float:
    """Seconds of a host<->device or disk transfer, by transfer size where the costs know it."""
    by_size = getattr(costs, "transfer", None)
    if by_size is not None:
        return by_size(kind, nbytes, chunk)
    rate = {"host_device": costs.host_device_Bps, "disk_read": costs.disk_read_Bps,
            "disk_write": costs.disk_write_Bps}[kind]
    return nbytes / rate if rate else 0.0


def optimizer_time(a: ModelArgs, s: StrategyConfig, costs, world: int, precision: str, m: int,
                   state_dtype: str = "fp32") -> float:
    """AdamW over the shard, plus the host-device traffic of a host tier (in bucket-sized
    pieces), exposed. NVMe traffic is ``offload_io``'s."""
    shard = rank_params(a, s) / (shard_group(s, world) if s.zero else 1)
    elem = 4 if precision == "fp32" else 2
    chunk = s.bucket_mb * 2**20
    t = 0.0
    if s.offload.optimizer == "none":
        t += costs.adam(shard)
    else:
        # bf16 moments: the compiled stochastic-rounding kernel (tetrad.zero.compact), measured
        # at 2.7x torch's fused fp32 AdamW per element on one core
        t += costs.host_adam(shard) * (BF16_ADAM_FACTOR if state_dtype == "bf16" else 1.0)
        if costs.host_device_Bps:
            t += _copy(costs, "host_device", 2 * elem * shard, chunk)
    if s.offload.params == "cpu" and costs.host_device_Bps:
        t += m * _copy(costs, "host_device", 2 * elem * shard, chunk)
    return t


BF16_ADAM_FACTOR = 2.7


def offload_io(a: ModelArgs, s: StrategyConfig, costs, world: int, precision: str, m: int,
               compute: float, state_dtype: str = "fp32") -> dict[str, float]:
    """NVMe time per step (tetrad.strategy.offload_cost): 'disk' the disk's busy seconds,
    'exposed' what the step waits for. Parameter reads and gradient writes overlap forward and
    backward (prefetch, write-behind) as far as compute lasts; the step's state stream is
    exposed under ``sync`` and shares the disk with them beside compute under ``overlap`` /
    ``delayed``."""
    if "nvme" not in (s.offload.optimizer, s.offload.params):
        return {"disk": 0.0, "exposed": 0.0}
    shard = rank_params(a, s) / (shard_group(s, world) if s.zero else 1)
    io = placement(s, costs, shard, precision, state_dtype, m)
    chunk = 4 * PIECE_ELEMS
    fb = _copy(costs, "disk_read", io["read_fb"], chunk) + _copy(costs, "disk_write", io["write_fb"], chunk)
    st = _copy(costs, "disk_read", io["read_step"], chunk) + _copy(costs, "disk_write", io["write_step"], chunk)
    if s.offload.step == "sync":
        exposed = max(0.0, fb - compute) + st
    else:
        exposed = max(0.0, fb + st - compute)
    return {"disk": fb + st, "exposed": exposed, "read_bytes": io["read_fb"] + io["read_step"],
            "write_bytes": io["write_fb"] + io["write_step"], "host_bytes": io["host"], "disk_bytes": io["disk"]}


def step_time(a: ModelArgs, s: StrategyConfig, costs, world: int, global_batch: int,
              precision: str, state_dtype: str = "fp32") -> dict[str, float]:
    """Predicted seconds per optimizer step and its parts."""
    elem = 4 if precision == "fp32" else 2
    m = micro_batches(global_batch, s, world)
    mb = micro_batch_times(a, s, costs, elem)
    compute, bubble = pipeline_time(s, mb, m, costs)
    parts = {"compute": compute - bubble - m * (mb["comm"] + mb["overhead"]), "tp_sp_comm": m * mb["comm"],
             "micro_batch_overhead": m * mb["overhead"], "bubble": bubble,
             "pp_comm": _p2p(a, s, costs, world, m, elem),
             "dp_comm": dp_time(a, s, costs, world, m, mb, elem),
             "sync": sync_time(s, costs, world),
             "optimizer": optimizer_time(a, s, costs, world, precision, m, state_dtype)}
    io = offload_io(a, s, costs, world, precision, m, compute, state_dtype)
    parts["offload_io"] = io["exposed"]
    parts["total"] = sum(parts.values())
    parts["disk_busy"] = io["disk"]  # (not a part of the sum: the disk's own busy time)
    return parts
