"""``FlatGroup``: parameters laid out back to back in one padded flat buffer, split in N shards.

Every ZeRO stage uses the same layout: a group's length is padded to a multiple of the dp
size N so that rank r owns the contiguous elements [r*S, (r+1)*S) with S = padded/N. A
parameter can straddle two shards; that is why checkpoint pieces are (box, flat range)
rather than whole tensors. Groups never mix parameters of different optimizer groups (their
weight decay differs), of different tensor-parallel kind (their squared norms are summed
over different process groups) or stage replicas with owned parameters (a replica's squares
are the owning stage's), so a group's master shard is one optimizer tensor with one set of
hyperparameters.

The tensors ZeRO keeps per group are attributes set inside ``tetrad.zero`` only (``full``,
``shard``, ``master``, ``grad_full``, ``grad_shard``); None means "not held here" (a tier may
hold it instead). Per-step bookkeeping (pending gradients, handles) belongs to whoever does
the work (``tetrad.zero.grads``), not to this record.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tetrad.checkpoint.pieces import is_stage_replica, tp_shard


@dataclass(eq=False)
class FlatGroup:
    params: list[nn.Parameter]
    names: list[str]
    offsets: list[int]
    numel: int                 # padded length, a multiple of world
    rank: int
    world: int
    opt_index: int             # index of the optimizer param group
    tensor_parallel: bool      # parameters sharded across the tp group
    index: int = 0             # position in the model's list of groups
    counted: bool = True       # False: a pipeline stage's copy of another stage's parameters
                               # (tied embeddings), left out of the gradient norm
    full: torch.Tensor | None = None        # compute-dtype flat parameters (params are views)
    shard: torch.Tensor | None = None       # compute-dtype local shard of the parameters
    master: torch.Tensor | None = None      # fp32 local shard the optimizer updates
    grad_full: torch.Tensor | None = None   # flat gradients of the whole group
    grad_shard: torch.Tensor | None = None  # reduced gradients of the local shard

    @property
    def shard_size(self) -> int:
        return self.numel // self.world

    @property
    def lo(self) -> int:
        return self.rank * self.shard_size

    @property
    def hi(self) -> int:
        return self.lo + self.shard_size

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Parameter ``i``'s slice of a full-length flat tensor, shaped like the parameter."""
        p = self.params[i]
        return flat[self.offsets[i]:self.offsets[i] + p.numel()].view(p.shape)

    def overlaps(self):
        """(name, param, start in the flattened param, slice of the local shard) for each
        parameter that has elements in this rank's shard."""
        for name, p, off in zip(self.names, self.params, self.offsets):
            a, b = max(off, self.lo), min(off + p.numel(), self.hi)
            if a < b:
                yield name, p, a - off, slice(a - self.lo, b - self.lo)


def _close(entries, rank: int, world: int, key: tuple[int, bool, bool]) -> FlatGroup:
    offsets, n = [], 0
    for _, p in entries:
        offsets.append(n)
        n += p.numel()
    n = max(world, -(-n // world) * world)
    return FlatGroup([p for _, p in entries], [name for name, _ in entries], offsets, n,
                     rank, world, key[0], key[1], counted=not key[2])


def plan_groups(named_params: list[tuple[str, nn.Parameter]], opt_index: dict[nn.Parameter, int],
                bucket_bytes: int, rank: int, world: int, elem_size: int) -> list[FlatGroup]:
    """Cut ``named_params`` (already in the order gradients will arrive) into flat groups.

    A group closes once it holds ``bucket_bytes`` (counted in the compute dtype) or when the
    next parameter belongs to another optimizer group / tensor-parallel kind / replica kind. Open groups of
    each kind are kept separately so that interleaved kinds (weights and biases) still form
    large buckets.
    """
    open_: dict[tuple[int, bool], list] = {}
    sizes: dict[tuple[int, bool], int] = {}
    groups: list[FlatGroup] = []
    for name, p in named_params:
        key = (opt_index[p], tp_shard(p) is not None, is_stage_replica(p))
        open_.setdefault(key, []).append((name, p))
        sizes[key] = sizes.get(key, 0) + p.numel() * elem_size
        if sizes[key] >= bucket_bytes:
            groups.append(_close(open_.pop(key), rank, world, key))
            sizes[key] = 0
    groups.extend(_close(entries, rank, world, key) for key, entries in open_.items())
    return groups


def number(groups: list[FlatGroup], start: int = 0) -> list[FlatGroup]:
    """Give each group its position (``index``) in the model's list of groups."""
    for i, g in enumerate(groups, start):
        g.index = i
    return groups
