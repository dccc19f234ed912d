"""Communication as named autograd functions, each with an explicit process group.

The forward of one is the backward of its partner (Megatron-LM's "mappings"):

=========================  ===========================  ===========================
function                   forward                      backward
=========================  ===========================  ===========================
copy_to_region             identity                     all-reduce
reduce_from_region         all-reduce                   identity
scatter_to_region          keep my slice of last dim    all-gather last dim
gather_from_region         all-gather last dim          keep my slice of last dim
scatter_to_sequence        keep my slice of seq dim     all-gather seq dim
gather_from_sequence       all-gather seq dim           reduce-scatter seq dim
reduce_scatter_to_sequence reduce-scatter seq dim       all-gather seq dim
all_to_all                 split dim a, concat dim b    split dim b, concat dim a
=========================  ===========================  ===========================

``RingPass`` is the one point-to-point primitive: every rank of a ring sends a tensor to the
next rank and receives the previous rank's, in one batch (context parallelism's K/V hops,
``tetrad.parallel.context``; its autograd lives in the ring attention function, whose
backward is a second walk of the ring).

Why pairs: a region that is replicated on every rank of the group (a tensor-parallel block's
input) must sum the partial gradients each rank computes for it, and a region whose output is
a sum of partial results must not sum the (already full) gradient again. Every function is the
identity on a group of one rank, so plans can apply them unconditionally. The group is always
an argument: nothing here reads a global "current tensor-parallel group".

Every collective, forward and backward, tells ``traffic`` (a ``tetrad.traffic.Traffic``, or
None: not counted) what it moved, from the tensors it passed; the counter is an argument too,
held by the layer that calls (``Counted.traffic``, set from the layout by ``count_into``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd import Function

from tetrad.compat import all_gather_single, reduce_scatter_single
from tetrad.traffic import Traffic, count

SEQ_DIM = 1  # activations are [batch, seq, hidden]


def _world(group) -> int:
    return dist.get_world_size(group)


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's contiguous chunk of `x` along `dim` (a copy, so the rest can be freed)."""
    world = _world(group)
    if x.shape[dim] % world:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} evenly over {world} ranks")
    return x.chunk(world, dim)[dist.get_rank(group)].contiguous()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _all_reduce(x: torch.Tensor, group, traffic: Traffic | None) -> torch.Tensor:
    x = x.contiguous()
    count(traffic, "all_reduce", group, _nbytes(x))
    dist.all_reduce(x, group=group)
    return x


def all_gather_tensor(x: torch.Tensor, dim: int, group, traffic: Traffic | None = None) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (collectives work on dim 0, so move it there)."""
    src = x.movedim(dim, 0).contiguous()
    out = src.new_empty((_world(group) * src.shape[0], *src.shape[1:]))
    count(traffic, "all_gather", group, _nbytes(src))
    all_gather_single(out, src, group=group)
    return out.movedim(0, dim)


def reduce_scatter_tensor(x: torch.Tensor, dim: int, group, traffic: Traffic | None = None) -> torch.Tensor:
    """Sum over ranks, each keeping its chunk of `dim`."""
    world = _world(group)
    if x.shape[dim] % world:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over {world} ranks")
    src = x.movedim(dim, 0).contiguous()
    out = src.new_empty((src.shape[0] // world, *src.shape[1:]))
    count(traffic, "reduce_scatter", group, _nbytes(out))
    reduce_scatter_single(out, src, group=group)
    return out.movedim(0, dim)


def _all_to_all(x: torch.Tensor, scatter_dim: int, gather_dim: int, group, traffic: Traffic | None) -> torch.Tensor:
    """Chunk j of `scatter_dim` goes to rank j; what rank i sent is concatenated along `gather_dim`."""
    world = _world(group)
    if x.shape[scatter_dim] % world:
        raise ValueError(f"cannot all-to-all dim {scatter_dim} of size {x.shape[scatter_dim]} over "
                         f"{world} ranks")
    send = torch.stack(x.chunk(world, scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    count(traffic, "all_to_all", group, _nbytes(send) // world)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _CopyToRegion(Function):
    @staticmethod
    def forward(ctx, x, group, traffic):
        ctx.group, ctx.traffic = group, traffic
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group, ctx.traffic), None, None


class _ReduceFromRegion(Function):
    @staticmethod
    def forward(ctx, x, group, traffic):
        return _all_reduce(x.clone(), group, traffic)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _ScatterToRegion(Function):
    @staticmethod
    def forward(ctx, x, dim, group, traffic):
        ctx.dim, ctx.group, ctx.traffic = dim, group, traffic
        return _split(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_tensor(grad, ctx.dim, ctx.group, ctx.traffic), None, None, None


class _GatherFromRegion(Function):
    @staticmethod
    def forward(ctx, x, dim, group, traffic):
        ctx.dim, ctx.group = dim, group
        return all_gather_tensor(x, dim, group, traffic)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.dim, ctx.group), None, None, None


class _GatherFromSequence(Function):
    @staticmethod
    def forward(ctx, x, dim, group, traffic):
        ctx.dim, ctx.group, ctx.traffic = dim, group, traffic
        return all_gather_tensor(x, dim, group, traffic)

    @staticmethod
    def backward(ctx, grad):
        # Every rank used the whole gathered sequence: sum their gradients, keep my slice.
        return reduce_scatter_tensor(grad, ctx.dim, ctx.group, ctx.traffic), None, None, None


class _ReduceScatterToSequence(Function):
    @staticmethod
    def forward(ctx, x, dim, group, traffic):
        ctx.dim, ctx.group, ctx.traffic = dim, group, traffic
        return reduce_scatter_tensor(x, dim, group, traffic)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_tensor(grad, ctx.dim, ctx.group, ctx.traffic), None, None, None


class _AllToAll(Function):
    @staticmethod
    def forward(ctx, x, scatter_dim, gather_dim, group, traffic):
        ctx.dims, ctx.group, ctx.traffic = (scatter_dim, gather_dim), group, traffic
        return _all_to_all(x, scatter_dim, gather_dim, group, traffic)

    @staticmethod
    def backward(ctx, grad):
        scatter_dim, gather_dim = ctx.dims
        return _all_to_all(grad, gather_dim, scatter_dim, ctx.group, ctx.traffic), None, None, None, None


def copy_to_region(x: torch.Tensor, group, traffic: Traffic | None = None) -> torch.Tensor:
    """Enter a region replicated over `group`: identity forward, all-reduce of gradients."""
    return x if _world(group) == 1 else _CopyToRegion.apply(x, group, traffic)


def reduce_from_region(x: torch.Tensor, group, traffic: Traffic | None = None) -> torch.Tensor:
    """Leave a region of partial sums: all-reduce forward, identity backward."""
    return x if _world(group) == 1 else _ReduceFromRegion.apply(x, group, traffic)


def scatter_to_region(x: torch.Tensor, group, dim: int = -1, traffic: Traffic | None = None) -> torch.Tensor:
    """Keep this rank's slice of the last dim; backward all-gathers it."""
    return x if _world(group) == 1 else _ScatterToRegion.apply(x, dim, group, traffic)


def gather_from_region(x: torch.Tensor, group, dim: int = -1, traffic: Traffic | None = None) -> torch.Tensor:
    """All-gather slices of the last dim; backward keeps this rank's slice."""
    return x if _world(group) == 1 else _GatherFromRegion.apply(x, dim, group, traffic)


def scatter_to_sequence(x: torch.Tensor, group, dim: int = SEQ_DIM, traffic: Traffic | None = None) -> torch.Tensor:
    """Keep this rank's slice of the sequence of a replicated tensor; backward all-gathers."""
    return x if _world(group) == 1 else _ScatterToRegion.apply(x, dim, group, traffic)


def gather_from_sequence(x: torch.Tensor, group, dim: int = SEQ_DIM, traffic: Traffic | None = None) -> torch.Tensor:
    """Megatron-SP entry to a tensor-parallel region: all-gather the sequence, reduce-scatter grads."""
    return x if _world(group) == 1 else _GatherFromSequence.apply(x, dim, group, traffic)


def reduce_scatter_to_sequence(x: torch.Tensor, group, dim: int = SEQ_DIM,
                               traffic: Traffic | None = None) -> torch.Tensor:
    """Megatron-SP exit: sum partial outputs and keep my sequence slice; backward all-gathers."""
    return x if _world(group) == 1 else _ReduceScatterToSequence.apply(x, dim, group, traffic)


def all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int,
               traffic: Traffic | None = None) -> torch.Tensor:
    """Ulysses re-partition: split `scatter_dim` over ranks and concatenate `gather_dim`.

    On [b, heads, s/P, hd] with scatter_dim=1, gather_dim=2 this turns a sequence shard of all
    heads into all of the sequence for heads/P heads; the backward is the reverse exchange.
    """
    return x if _world(group) == 1 else _AllToAll.apply(x, scatter_dim, gather_dim, group, traffic)


class Counted:
    """A layer whose collectives are counted: ``traffic`` is the layout's counter (None: off),
    set on every such layer of a model by ``count_into`` once the plan has built them (the
    styles build layers from groups alone; the counter is the layout's, one per process)."""

    traffic: Traffic | None = None


def count_into(model, traffic: Traffic | None):
    """Point every ``Counted`` layer of ``model`` at ``traffic``; returns the model."""
    for m in model.modules():
        if isinstance(m, Counted):
            m.traffic = traffic
    return model


class _Pending:
    """A posted ring hop: ``wait()`` returns the tensor received from the previous rank."""

    def __init__(self, works, sent: torch.Tensor, received: torch.Tensor):
        self.works, self._sent, self.received = works, sent, received

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        self._sent = None  # the send buffer may go now
        return self.received


class RingPass:
    """One hop around the ring of ``group``: send to rank r+1, receive from rank r-1.

    Both ops go in one ``batch_isend_irecv`` and every rank posts the same batch, so the
    exchange is symmetric (NCCL-safe: no rank waits on a send its peer has not matched).
    ``tag`` keeps two rings in flight between the same ranks apart (gloo matches by tag);
    ``traffic`` counts each send to the next rank.
    """

    def __init__(self, group, tag: int = 0, traffic: Traffic | None = None):
        rank, world = dist.get_rank(group), _world(group)
        self.next = dist.get_global_rank(group, (rank + 1) % world)
        self.prev = dist.get_global_rank(group, (rank - 1) % world)
        self.group, self.tag, self.traffic = group, tag, traffic

    def start(self, x: torch.Tensor) -> _Pending:
        """Post the hop of ``x`` (contiguous); overlap work, then ``wait()`` for the neighbour's."""
        x = x.contiguous()
        recv = torch.empty_like(x)
        if self.traffic is not None:
            self.traffic.send(self.next, _nbytes(x))
        ops = [dist.P2POp(dist.isend, x, self.next, self.group, self.tag),
               dist.P2POp(dist.irecv, recv, self.prev, self.group, self.tag)]
        return _Pending(dist.batch_isend_irecv(ops), x, recv)
