"""The two flat collectives ZeRO needs, with explicit groups.

Both go through ``tetrad.compat`` (the ``*_single`` names of recent torch, the older ones on
the declared floor). Gradients are divided by the group size
*before* the sum (SUM rather than AVG, which gloo lacks), so low-precision sums of N
gradients cannot overflow where the average would not.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tetrad.compat import all_gather_single, reduce_scatter_single
from tetrad.device import Done





def group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def reduce_scatter_avg(out: torch.Tensor, flat: torch.Tensor, group):
    """Asynchronously: ``out`` = this rank's 1/N of the average of ``flat`` over ``group``."""
    world = group_size(group)
    if world == 1:
        out.copy_(flat)
        return Done()
    flat.div_(world)
    return reduce_scatter_single(out, flat, group=group, async_op=True)


def all_gather(out: torch.Tensor, shard: torch.Tensor, group):
    """Asynchronously: ``out`` = the concatenation of every rank's ``shard``."""
    if group_size(group) == 1:
        out.copy_(shard)
        return Done()
    return all_gather_single(out, shard, group=group, async_op=True)


def all_reduce_avg(flat: torch.Tensor, group):
    """Asynchronously average ``flat`` in place over ``group``."""
    world = group_size(group)
    if world == 1:
        return Done()
    flat.div_(world)
    return dist.all_reduce(flat, group=group, async_op=True)
