"""ZeRO-sharded data parallelism (Rajbhandari et al., arXiv:1910.02054) over the dp group.

``build_data_parallel`` returns one object with the same interface for stages 0-3; see
``base.DataParallel``. Memory per rank with Adam, Ψ parameters and N ranks (mixed
precision / fp32): stage 0 16Ψ / 16Ψ, stage 1 4Ψ+12Ψ/N / 8Ψ+8Ψ/N, stage 2 2Ψ+14Ψ/N /
4Ψ+12Ψ/N, stage 3 16Ψ/N / 16Ψ/N, plus communication buffers. Where masters, optimizer
state, gradients and stage-3 shards rest is the ``tier``'s choice (``tetrad.zero.tier``;
``tetrad.offload`` provides host and NVMe tiers), never this package's.
"""

from __future__ import annotations

import torch
from torch import nn

from tetrad.zero.base import DataParallel
from tetrad.zero.builder import group_options, optimizer_template
from tetrad.zero.comm import group_rank, group_size
from tetrad.zero.flat import number, plan_groups
from tetrad.zero.grads import FullGrads, ShardedGrads
from tetrad.zero.master import MasterOptimizer, ResidentTier
from tetrad.zero.memory import live_tensor_bytes, memory_report
from tetrad.zero.publish import ReplicatedPublisher, ShardedPublisher
from tetrad.zero.scaler import DynamicLossScaler
from tetrad.zero.sharding import Sharding
from tetrad.zero.stage012 import ReplicatedParams
from tetrad.zero.stage3 import ShardedParams
from tetrad.zero.tier import GradSink, MasterStore, Placement, ShardStore, Tier, When
from tetrad.zero.units import find_units

STAGES = (0, 1, 2, 3)


def _device(model: nn.Module) -> torch.device:
    """The compute device: where the model's parameters (or buffers) are."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


def build_data_parallel(model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None,
                        optim_cfg=None, stage: int = 0, group=None, dtype: torch.dtype = torch.float32,
                        bucket_bytes: int = 25 * 2**20, tier: Tier | None = None,
                        param_init=None, device: torch.device | None = None,
                        sharding: Sharding | None = None) -> DataParallel:
    """Take ownership of ``model``'s parameters, gradients and optimizer for ZeRO ``stage``.

    The parameters are cast to the compute ``dtype`` in place (buffers are left alone: RoPE
    tables stay fp32); fp32 masters live in the returned object, or in ``tier``.
    ``optimizer`` (a fresh instance) or ``optim_cfg`` (tetrad AdamW) says what to build over
    the master shards. ``param_init(name, param)``, stage 3 only, fills each parameter of a
    model built with untouched storage just before its group is sharded (deferred init of
    models larger than memory). ``device`` (default: where the model is) is the compute
    device; at stage 3 the model may still be on the host: each group moves to the device as
    it is sharded, so the whole model never has to fit there. ``sharding`` (default: flat
    ZeRO over ``group``) gives hybrid sharding's shard and replicate groups, ZeRO++'s hpZ
    secondary group and qwZ / qgZ switches, and the byte counter (``tetrad.zero.sharding``);
    its ``shard`` group then replaces ``group``.
    """
    if stage not in STAGES:
        raise ValueError(f"strategy.zero={stage!r} is not valid; use one of {STAGES}")
    sharding = sharding or Sharding(shard=group)
    sharding.check(stage)
    group = sharding.shard
    device = device or _device(model)
    template, builder = optimizer_template(model, optimizer, optim_cfg)
    opt_index = {p: i for i, g in enumerate(template) for p in g["params"]}
    trained = [(n, p) for n, p in model.named_parameters() if p in opt_index]
    with torch.no_grad():  # frozen parameters only change dtype (and move, at stage 3)
        for p in model.parameters():
            if p not in opt_index:
                p.data = p.data.to(device=device, dtype=dtype if p.is_floating_point() else p.dtype)
    world, rank = (group_size(group), group_rank(group)) if stage > 0 else (1, 0)
    size = torch.tensor([], dtype=dtype).element_size()
    if stage < 3:
        # Reverse order of definition approximates the order backward produces gradients.
        groups = number(plan_groups(trained[::-1], opt_index, bucket_bytes, rank, world, size))
        units = None
    else:
        units = [(spec, plan_groups(spec.params, opt_index, 2**62, rank, world, size))
                 for spec in find_units(model, set(opt_index))]
        groups = number([g for _, gs in units for g in gs])
    scaler = DynamicLossScaler() if dtype == torch.float16 else None
    placement = (tier or ResidentTier()).place(
        groups, builder=builder, options=group_options(template), scaler=scaler, dp_group=group,
        sharded=stage > 0, grads_to_sink=stage >= 2, dtype=dtype, rank=group_rank(group),
        device=device)
    if stage < 3:
        params = ReplicatedParams(model, groups, dtype=dtype, placement=placement)
        publisher = ReplicatedPublisher(group, dtype, sharding.traffic)
        # after the parameters took the compute dtype: the flat gradients are views in it
        grads = (ShardedGrads(groups, group, dtype, sink=placement.sink, sharding=sharding) if stage == 2
                 else FullGrads(groups, group, dtype, scatter=stage == 1, sharding=sharding))
    else:
        # Gradient hooks first: on each parameter they run in registration order, before the
        # hooks that free the unit.
        grads = ShardedGrads(groups, group, dtype, sink=placement.sink, sharding=sharding)
        params = ShardedParams(model, units, group=group, dtype=dtype, placement=placement,
                               param_init=param_init, device=device, sharding=sharding)
        publisher = ShardedPublisher(placement.shards, dtype)
    return DataParallel(model, stage=stage, params=params, grads=grads, master=placement.masters(),
                        publisher=publisher, scaler=scaler, replica_rank=sharding.replica_rank)


__all__ = ["DataParallel", "DynamicLossScaler", "GradSink", "MasterOptimizer", "MasterStore",
           "Placement", "ResidentTier", "STAGES", "ShardStore", "Sharding", "Tier", "When",
           "build_data_parallel", "live_tensor_bytes", "memory_report"]
