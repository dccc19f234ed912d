"""The ZeRO group split by node: hybrid sharding, hpZ and qgZ groups, and the byte counter.

ZeRO runs over the gradient group (the ranks of one model-parallel position: dp x cp x sp). On
a cluster that group spans nodes; ``NodeSplit`` cuts it three ways, each only when asked for:

* ``dp_shard`` (hybrid sharding): shard groups of dp_shard consecutive dp ranks (x cp x sp), and
  replicate groups joining the ranks that hold the same shard in every shard group;
* ``hpz``: secondary groups of hpz consecutive dp ranks (x cp x sp) inside each shard group (a
  node, when hpz x sp x tp... fit one: consecutive dp ranks are neighbours on the mesh);
* qgZ: the shard group's members on this node (``intra``) and those with this rank's local
  index on every node (``inter``). This needs the shard group to have the same number of
  members on every node it touches; the rule book (``tetrad.config.sharding_rules``) says so
  before any group exists.

Nodes are ``rank // ranks_per_node`` (torchrun, SLURM block distribution; ``tetrad.traffic``).
Every rank enumerates every group (``new_subgroups_by_enumeration``, the public c10d call).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from tetrad.parallel.mesh import AXES, LayoutError, ParallelDims
from tetrad.traffic import Traffic

GRAD_AXES = ("dp", "cp", "sp")  # the axes whose ranks see different tokens of one model replica


@dataclass(frozen=True)
class NodeSplit:
    ranks_per_node: int
    dp_shard: int                # dp ranks per shard group (= dp: flat ZeRO)
    hpz: int                     # dp ranks per hpZ secondary group (1: off)
    traffic: Traffic
    shard_group: object = None   # None: the gradient group itself
    replicate_group: object = None
    hpz_group: object = None
    dp_intra: object = None
    dp_inter: object = None

    @property
    def nodes(self) -> int:
        return self.traffic.nodes


def _model_key(c: dict) -> tuple:
    return tuple(c[a] for a in AXES if a not in GRAD_AXES)


def _partition(dims: ParallelDims, key) -> list[list[int]]:
    """Global ranks grouped by ``key(coords, rank)``, each group in rank order."""
    groups: dict = {}
    for rank in range(dims.world_size):
        groups.setdefault(key(dims.coords(rank), rank), []).append(rank)
    return sorted(groups.values())


def _new(partition: list[list[int]]):
    group, _ = dist.new_subgroups_by_enumeration(partition)
    return group


def node_blocks(members: list[int], ranks_per_node: int) -> list[list[int]]:
    """A group's members cut by node, in rank order."""
    blocks: dict[int, list[int]] = {}
    for r in members:
        blocks.setdefault(r // ranks_per_node, []).append(r)
    return [blocks[n] for n in sorted(blocks)]


def _hierarchy(dims: ParallelDims, shards: list[list[int]], rpn: int) -> tuple[list, list]:
    """(intra, inter) partitions of every shard group: per node, and per local index."""
    intra, inter = [], []
    for members in shards:
        blocks = node_blocks(members, rpn)
        if len({len(b) for b in blocks}) != 1:
            raise LayoutError(f"strategy.zeropp.quantize_grads: the ZeRO group {members} has "
                              f"{[len(b) for b in blocks]} members on its nodes (ranks_per_node={rpn}); "
                              f"the hierarchical all-to-all needs the same number on every node")
        intra += blocks
        inter += [[b[j] for b in blocks] for j in range(len(blocks[0]))]
    return sorted(intra), sorted(inter)


def build_node_split(dims: ParallelDims, *, ranks_per_node: int, dp_shard: int, hpz: int,
                     quantize_grads: bool) -> NodeSplit:
    """The groups the strategy asks for (collective: every rank calls it, in the same order)."""
    rank = dist.get_rank()
    traffic = Traffic(ranks_per_node, rank, dims.world_size)
    if dims.dp % dp_shard or dp_shard % hpz:
        raise LayoutError(f"strategy.dp_shard={dp_shard} must divide dp={dims.dp} and "
                          f"strategy.zeropp.hpz={hpz} must divide dp_shard")
    shards = _partition(dims, lambda c, r: (_model_key(c), c["dp"] // dp_shard))
    kw = {}
    if dp_shard < dims.dp:
        kw["shard_group"] = _new(shards)
        kw["replicate_group"] = _new(_partition(
            dims, lambda c, r: (_model_key(c), c["dp"] % dp_shard) + tuple(c[a] for a in GRAD_AXES[1:])))
    if hpz > 1:
        kw["hpz_group"] = _new(_partition(dims, lambda c, r: (_model_key(c), c["dp"] // hpz)))
    if quantize_grads:
        intra, inter = _hierarchy(dims, shards, ranks_per_node)
        kw["dp_intra"], kw["dp_inter"] = _new(intra), _new(inter)
    return NodeSplit(ranks_per_node, dp_shard, hpz, traffic, **kw)
