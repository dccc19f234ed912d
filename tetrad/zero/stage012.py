"""Stages 0, 1 and 2: every rank keeps the full compute parameters.

Parameters become views into one flat compute-dtype buffer per group so that after the
optimizer step one ``all_gather_into_tensor`` per group refreshes them from the updated
master shards, with no per-parameter copies. Stage 0 is the same machinery with one shard
per group (the whole group) and an all-reduce of gradients: plain data parallelism, but with
the same mixed-precision memory layout (16Ψ) as the paper's baseline.
"""

from __future__ import annotations

import torch

from tetrad.zero.base import DataParallel, flat_fp32, init_master
from tetrad.zero.comm import all_gather
from tetrad.zero.flat import FlatGroup
from tetrad.zero.grads import FullGrads, ShardedGrads


class FlatDataParallel(DataParallel):
    def __init__(self, model, groups: list[FlatGroup], *, stage: int, group, dtype: torch.dtype):
        super().__init__(model, groups, group=group, dtype=dtype)
        self.stage = stage
        for g in groups:
            flat32 = flat_fp32(g)
            g.full = flat32 if dtype == torch.float32 else flat32.to(dtype)
            with torch.no_grad():
                for i, p in enumerate(g.params):
                    p.data = g.view(g.full, i)
            g.shard = g.full[g.lo:g.hi]
            init_master(g, flat32, dtype, g.shard)
        if stage == 2:
            self.grads = ShardedGrads(groups, group, dtype)
        else:
            self.grads = FullGrads(groups, group, dtype, scatter=stage == 1)

    @torch.no_grad()
    def _publish(self) -> None:
        if self.stage == 0:
            for g in self.groups:
                if g.master is not g.shard:
                    g.full.copy_(g.master)
            return
        handles = []
        for g in self.groups:
            # A separate input tensor: gathering a slice of the output into itself is not
            # allowed by every backend.
            src = g.master.to(self.dtype, copy=True)
            handles.append((all_gather(g.full, src, self.group), src))
        for handle, _ in handles:
            handle.wait()
