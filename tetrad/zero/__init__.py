"""ZeRO-sharded data parallelism (Rajbhandari et al., arXiv:1910.02054) over the dp group.

``build_data_parallel`` returns one object with the same interface for stages 0-3; see
``base.DataParallel``. Memory per rank with Adam, Ψ parameters and N ranks (mixed
precision / fp32): stage 0 16Ψ / 16Ψ, stage 1 4Ψ+12Ψ/N / 8Ψ+8Ψ/N, stage 2 2Ψ+14Ψ/N /
4Ψ+12Ψ/N, stage 3 16Ψ/N / 16Ψ/N, plus communication buffers.
"""

from __future__ import annotations

import torch
from torch import nn

from tetrad.zero.base import DataParallel
from tetrad.zero.builder import group_options, optimizer_template
from tetrad.zero.comm import group_rank, group_size
from tetrad.zero.flat import plan_groups
from tetrad.zero.master import MasterOptimizer
from tetrad.zero.memory import live_tensor_bytes, memory_report
from tetrad.zero.scaler import DynamicLossScaler
from tetrad.zero.stage012 import FlatDataParallel
from tetrad.zero.stage3 import Stage3DataParallel
from tetrad.zero.units import find_units

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_data_parallel(model: nn.Module, *, optimizer: torch.optim.Optimizer | None = None,
                        optim_cfg=None, stage: int = 0, group=None, precision: str = "fp32",
                        bucket_bytes: int = 25 * 2**20, device=None, offload=None,
                        param_init=None) -> DataParallel:
    """Take ownership of ``model``'s parameters, gradients and optimizer for ZeRO ``stage``.

    The parameters are cast to the compute dtype of ``precision`` in place (buffers are
    left alone: RoPE tables stay fp32); fp32 masters live in the returned object.
    ``optimizer`` (a fresh instance) or ``optim_cfg`` (tetrad AdamW) says what to build over
    the master shards. ``offload`` (a ``strategy.offload`` section) puts masters, optimizer
    state and, at stage 3, parameter shards in host memory or NVMe files (tetrad.offload);
    ``param_init(name, param)``, stage 3 only, fills each parameter of a model built with
    untouched storage just before its group is sharded (deferred init of models larger than
    memory).
    """
    from tetrad.offload.tiers import Offload

    off = Offload.build(offload, stage, COMPUTE_DTYPES.get(precision))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"strategy.zero={stage!r} is not valid; use 0, 1, 2 or 3")
    dtype = COMPUTE_DTYPES[precision]
    template, builder = optimizer_template(model, optimizer, optim_cfg)
    opt_index = {p: i for i, g in enumerate(template) for p in g["params"]}
    trained = [(n, p) for n, p in model.named_parameters() if p in opt_index]
    with torch.no_grad():  # frozen parameters only change dtype
        for p in model.parameters():
            if p not in opt_index and p.is_floating_point():
                p.data = p.data.to(dtype)
    world, rank = (group_size(group), group_rank(group)) if stage > 0 else (1, 0)
    size = torch.tensor([], dtype=dtype).element_size()
    if stage < 3:
        # Reverse order of definition approximates the order backward produces gradients.
        groups = plan_groups(trained[::-1], opt_index, bucket_bytes, rank, world, size)
        if off is not None:
            off.plan(groups, builder, group_options(template))
        dp = FlatDataParallel(model, groups, stage=stage, group=group, dtype=dtype)
        for g in groups if off is not None else []:
            off.adopt(g)
    else:
        units = [(spec, plan_groups(spec.params, opt_index, 2**62, rank, world, size))
                 for spec in find_units(model, set(opt_index))]
        if off is not None:
            off.plan([g for _, gs in units for g in gs], builder, group_options(template))
        dp = Stage3DataParallel(model, units, group=group, dtype=dtype, offload=off,
                                param_init=param_init)
    scaler = DynamicLossScaler() if precision == "fp16" else None
    if off is None:
        dp.master = MasterOptimizer(dp.groups, group_options(template), builder, sharded=stage > 0,
                                    dp_group=group, scaler=scaler)
        return dp
    dp.offload = off
    dp.master = off.master(dp, group_options(template), builder, sharded=True, dp_group=group,
                           scaler=scaler)
    off.attach(dp)
    return dp


__all__ = ["COMPUTE_DTYPES", "DataParallel", "DynamicLossScaler", "build_data_parallel",
           "live_tensor_bytes", "memory_report"]
