"""The flat collectives ZeRO needs, with explicit groups, each counting the bytes it moves.

All go through ``tetrad.compat`` (the ``*_single`` names of recent torch, the older ones on
the declared floor). Gradients are divided by the group size
*before* the sum (SUM rather than AVG, which gloo lacks), so low-precision sums of N
gradients cannot overflow where the average would not. ``traffic`` (a ``tetrad.traffic.Traffic``,
or None) is told what each call moved; the quantized ZeRO++ collectives are in
``tetrad.zero.zeropp``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tetrad.compat import all_gather_single, reduce_scatter_single
from tetrad.device import Done
from tetrad.traffic import Traffic, count


def group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def reduce_scatter_avg(out: torch.Tensor, flat: torch.Tensor, group, traffic: Traffic | None = None):
    """Asynchronously: ``out`` = this rank's 1/N of the average of ``flat`` over ``group``."""
    world = group_size(group)
    if world == 1:
        out.copy_(flat)
        return Done()
    flat.div_(world)
    count(traffic, "reduce_scatter", group, nbytes(out))
    return reduce_scatter_single(out, flat, group=group, async_op=True)


def all_gather(out: torch.Tensor, shard: torch.Tensor, group, traffic: Traffic | None = None):
    """Asynchronously: ``out`` = the concatenation of every rank's ``shard``."""
    if group_size(group) == 1:
        out.copy_(shard)
        return Done()
    count(traffic, "all_gather", group, nbytes(shard))
    return all_gather_single(out, shard, group=group, async_op=True)


def all_reduce_avg(flat: torch.Tensor, group, traffic: Traffic | None = None):
    """Asynchronously average ``flat`` in place over ``group``."""
    world = group_size(group)
    if world == 1:
        return Done()
    flat.div_(world)
    count(traffic, "all_reduce", group, nbytes(flat))
    return dist.all_reduce(flat, group=group, async_op=True)


def all_to_all(out: torch.Tensor, inp: torch.Tensor, group, traffic: Traffic | None = None):
    """Asynchronously: chunk j of ``inp`` (dim 0 split in N) goes to rank j; ``out``'s chunk i
    is what rank i sent."""
    world = group_size(group)
    if world == 1:
        out.copy_(inp)
        return Done()
    count(traffic, "all_to_all", group, nbytes(inp) // world)
    return dist.all_to_all_single(out, inp, group=group, async_op=True)


class Then:
    """A handle that waits for ``handles`` and then runs ``finish()`` once: a collective whose
    result needs work on arrival (dequantizing, the next stage of a hierarchical reduce)."""

    def __init__(self, handles: list, finish=None):
        self.handles, self.finish = handles, finish

    def wait(self) -> bool:
        for h in self.handles:
            h.wait()
        self.handles = []
        if self.finish is not None:
            finish, self.finish = self.finish, None
            finish()
        return True
