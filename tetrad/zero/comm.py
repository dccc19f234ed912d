"""The two flat collectives ZeRO needs, with explicit groups.

``reduce_scatter_tensor`` / ``all_gather_into_tensor`` are deprecated in favour of the
``*_single`` names in recent torch; both are tried so the package runs on either. Gradients are divided by the group size
*before* the sum (SUM rather than AVG, which gloo lacks), so low-precision sums of N
gradients cannot overflow where the average would not.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Done:
    """A handle of work that finished when it was issued: a collective with nothing to
    communicate (a group of one), a host-memory copy. Same surface as the async handles it
    stands in for (c10d ``Work.wait``, offload ``Transfer.done``/``add_done_callback``)."""

    def wait(self) -> bool:
        return True

    def done(self) -> bool:
        return True

    def add_done_callback(self, cb) -> None:
        cb(self)


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
    return _reduce_scatter(out, flat, group=group, async_op=True)


def all_gather(out: torch.Tensor, shard: torch.Tensor, group):
    """Asynchronously: ``out`` = the concatenation of every rank's ``shard``."""
    if group_size(group) == 1:
        out.copy_(shard)
        return Done()
    return _all_gather(out, shard, group=group, async_op=True)


def all_reduce_avg(flat: torch.Tensor, group):
    """Asynchronously average ``flat`` in place over ``group``."""
    world = group_size(group)
    if world == 1:
        return Done()
    flat.div_(world)
    return dist.all_reduce(flat, group=group, async_op=True)
