"""Pipeline parallelism: stage split, schedules as action lists, p2p, one executor.

Pieces: ``stages`` says how a model family runs as pipeline pieces (tetrad's Transformer,
Hugging Face models from their ``base_model_pp_plan`` or by module names), ``split`` prunes
the model to this rank's chunks (names kept; layers balanced by modelled cost or given by
``strategy.pp_split``), ``actions`` is the IR (F/B/W actions and the chunk ``Placement``),
``schedule`` writes GPipe, 1F1B, interleaved 1F1B, ZB-H1 and looped breadth-first as per-rank
action lists and ``vshape`` ZB-V, ``simulate`` checks them for deadlock and computes their
bubbles on a cost model, ``p2p`` moves fixed-shape activations and gradients between stages,
``zero_bubble`` splits backward into input- and weight-gradient passes, ``executor`` runs a
rank's list, ``tied`` sums a tied embedding's gradients over the first and last stage, and
``trace`` measures busy/idle time and writes Chrome traces.

Why our own scheduler rather than ``torch.distributed.pipelining``: a quick experiment here
(torch 2.13, gloo, 2 ranks, a 4-Linear model) showed its GPipe, 1F1B and interleaved
zero-bubble schedules do run on gloo and match one process (to 3e-8, once
``scale_grads=False``: by default it divides gradients by the micro-batch count itself). We
still write a compact executor because tetrad needs, per action, (1) busy/idle timing and a
Chrome trace for the bubble measurements, which its schedules do not expose; (2) control of
when gradients are synchronised: tetrad's ZeRO reduces from post-accumulate-grad hooks and
must sync once after all micro-batches, while ``PipelineStage`` knows only DDP/FSDP; (3) the
weight-gradient split and the action IR, which in torch are private (``_backward``,
``_Action``) and change between releases; (4) stage modules that keep the whole model's
parameter names for checkpoints. Each schedule is ~15 lines of data, so the cost is small.

Zero-bubble and recomputation: Linears inside recomputed modules keep their weight gradients
in B (see ``zero_bubble.exclude_recomputed``), so with ``recompute: full`` ZB-H1 runs exact
but with an almost empty W pass; ``selective`` keeps the whole split.

Only the owning stage builds its layers: the Trainer builds the model on the meta device,
the engine prunes it to this rank's chunks, then materialises and initialises what is left.
tetrad's init draws each parameter from a generator seeded by (seed, parameter name), so a
stage's parameters equal the whole model's bit for bit. Tensor parallelism slices the held,
materialised layers after the prune (order: pipeline prune -> tp/sp -> recompute -> ZeRO).

With tp and without Megatron-SP every tp rank of a stage holds the same boundary activation
(and the same input gradient): ``p2p`` sends only this tp rank's 1/tp of it, flattened, and
the receiver all-gathers over the tp group (Megatron's scatter/gather), cutting inter-stage
bytes by tp. With Megatron-SP the activations are already sequence-sharded per tp rank.

Not yet: ZB-H2 and the paper's automatic (ILP) schedules.
"""

from __future__ import annotations

from typing import Callable

import torch

from tetrad.parallel.pipeline.executor import PipelineExecutor
from tetrad.parallel.pipeline.p2p import StageComm
from tetrad.parallel.pipeline.actions import Action, Placement
from tetrad.parallel.pipeline.schedule import (SCHEDULES, build_schedule, check_micro_batches,
                                               chunks_per_rank, placement)
from tetrad.parallel.pipeline.simulate import bubble, simulate, theoretical_bubble
from tetrad.parallel.pipeline.split import (Chunk, balanced_partition, even_partition, measure_costs,
                                            modelled_costs, partition, split_model, stage_replicas,
                                            stage_ties)
from tetrad.parallel.pipeline.tied import TiedWeights
from tetrad.parallel.pipeline.trace import Timeline, trace_path
from tetrad.parallel.pipeline.zero_bubble import WeightGradStore, active_store, defer


def build_pipeline(model: torch.nn.Module, group, *, schedule: str, virtual_stages: int,
                   dtype: torch.dtype, device: torch.device, loss_fn: Callable,
                   act_shape: tuple[int, ...] | None = None, ranges: list[range] | None = None,
                   trace: str | None = None, instrument: bool = False,
                   chunks: list[Chunk] | None = None, tp_group=None,
                   channels: dict | None = None, traffic=None) -> PipelineExecutor:
    """Prune ``model`` in place to this rank's chunks of the pp ``group`` and return the
    executor that runs ``schedule`` over them (``chunks``: ``split_model`` already ran, e.g.
    on the meta device before materialising). ``act_shape`` ([micro_batch, local_seq, d_model])
    may instead be given to each ``run``. ``trace`` (a path) implies ``instrument``.
    ``tp_group``: the boundary tensors are replicated over it, so each rank sends 1/tp of them
    and the receiver all-gathers (None: send whole, e.g. Megatron-SP's already-sharded ones).
    ``channels``: the p2p communicators of this rank's line (``p2p.ring_channels``; made from
    ``group`` alone when None, which every rank of the world must then call together).
    ``traffic``: a ``tetrad.traffic.Traffic`` told the bytes of every send."""
    import torch.distributed as dist

    p, rank = dist.get_world_size(group), dist.get_rank(group)
    v = virtual_stages
    check_micro_batches(schedule, p, max(p, 1), v)  # validates the schedule name / v early
    place = placement(schedule, p, v)
    if chunks is None:
        chunks = split_model(model, rank, p, ranges=ranges, placement=place)
    comm = StageComm(group, act_shape, dtype, device, tp_group=tp_group, owner=place.rank_of,
                     channels=channels)
    comm.traffic = traffic
    timeline = Timeline(dist.get_rank(), trace) if (trace or instrument) else None
    cache: dict[int, list[Action]] = {}

    def schedule_fn(m: int) -> list[Action]:
        if m not in cache:
            cache[m] = build_schedule(schedule, p, m, v)[rank]
        return cache[m]

    return PipelineExecutor(chunks, schedule_fn, comm, loss_fn, timeline=timeline, placement=place)


__all__ = ["Action", "Chunk", "PipelineExecutor", "Placement", "SCHEDULES", "StageComm", "TiedWeights",
           "Timeline", "WeightGradStore", "active_store", "balanced_partition", "bubble", "build_pipeline",
           "build_schedule", "check_micro_batches", "chunks_per_rank", "defer", "even_partition",
           "measure_costs", "modelled_costs", "partition", "placement", "simulate", "split_model",
           "stage_replicas", "stage_ties", "theoretical_bubble", "trace_path"]
