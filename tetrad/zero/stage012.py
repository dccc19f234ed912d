"""Stages 0, 1 and 2: every rank keeps the full compute parameters.

Parameters become views into one flat compute-dtype buffer per group so that after the
optimizer step one ``all_gather_into_tensor`` per group (``ReplicatedPublisher``) refreshes
them from the updated master shards, with no per-parameter copies. Stage 0 is the same
machinery with one shard per group (the whole group) and an all-reduce of gradients: plain
data parallelism, but with the same mixed-precision memory layout (16Ψ) as the paper's
baseline.
"""

from __future__ import annotations

import torch
from torch import nn

from tetrad.zero.flat import FlatGroup
from tetrad.zero.tier import Placement


def flat_fp32(g: FlatGroup) -> torch.Tensor:
    """The group's parameters concatenated in fp32, zero padded."""
    flat = torch.zeros(g.numel, dtype=torch.float32, device=g.params[0].device)
    with torch.no_grad():
        for i, p in enumerate(g.params):
            g.view(flat, i).copy_(p.detach())
    return flat


def new_master(flat32: torch.Tensor, g: FlatGroup, dtype: torch.dtype, compute: torch.Tensor) -> torch.Tensor:
    """The fp32 master shard: the compute shard itself in fp32 training (no second copy,
    hence the paper's 4Ψ+12Ψ/N for fp32 stage 1), else a copy of the *original* fp32 values
    (not the rounded compute copy)."""
    return compute if dtype == torch.float32 else flat32[g.lo:g.hi].clone()


class ReplicatedParams:
    """Holds stage 0-2 parameters: whole groups on every rank, the rank's shard a view."""

    def __init__(self, model: nn.Module, groups: list[FlatGroup], *, dtype: torch.dtype,
                 placement: Placement):
        self.model, self.groups = model, groups
        for g in groups:
            flat32 = flat_fp32(g)
            g.full = flat32 if dtype == torch.float32 else flat32.to(dtype)
            with torch.no_grad():
                for i, p in enumerate(g.params):
                    p.data = g.view(g.full, i)
            g.shard = g.full[g.lo:g.hi]
            g.master = placement.adopt_master(g, new_master(flat32, g, dtype, g.shard))

    def begin_backward(self, sync: bool) -> None:
        pass

    def finish(self) -> None:
        pass

    gathers = 0  # never gathered: every rank keeps the full parameters

    def hold(self, params, backward: bool = False) -> None:
        pass  # always resident

    def release(self, params) -> None:
        pass
