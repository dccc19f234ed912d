"""Bytes moved by collectives, split into intra- and inter-node: ``Traffic``.

Each collective call site tells a ``Traffic`` what it moved (from the tensors it passed,
not from a formula), and the counter attributes every peer's share to "intra" or "inter"
by whether that peer is on this rank's node. Counted as the ZeRO++ paper counts volume:
what this rank must send to each other member of the group with a bandwidth-optimal,
direct exchange (all-gather: its shard to each peer; reduce-scatter: each peer's chunk;
all-reduce: a reduce-scatter plus an all-gather, 2/n of the buffer to each peer; all-to-all:
each peer's chunk). The physical bytes on each link depend on the algorithm NCCL or gloo
picks (a ring crosses a node boundary on fewer links, more often); this is the volume the
schedule requires, which is what hierarchical sharding and ZeRO++ shrink.

Nodes: ranks ``[j * ranks_per_node, (j + 1) * ranks_per_node)`` share node j, the placement
torchrun gives (its agents number their workers contiguously) and SLURM's default block
distribution. Its own module at the bottom floor because ``tetrad.zero`` and
``tetrad.parallel`` (one floor, never importing each other) both count through it.
"""

from __future__ import annotations

import torch.distributed as dist


class Traffic:
    """Bytes this rank sent since the last ``take()``, as {"intra": n, "inter": n}."""

    def __init__(self, ranks_per_node: int, rank: int, world: int):
        if ranks_per_node < 1:
            raise ValueError(f"ranks_per_node={ranks_per_node}: must be >= 1")
        self.ranks_per_node, self.rank, self.world = ranks_per_node, rank, world
        self.counts = {"intra": 0, "inter": 0}
        self._split: dict = {}  # group -> (peers on this node, peers on other nodes)

    def node(self, rank: int) -> int:
        return rank // self.ranks_per_node

    @property
    def nodes(self) -> int:
        return -(-self.world // self.ranks_per_node)

    @property
    def spans_nodes(self) -> bool:
        return self.nodes > 1

    def split(self, group) -> tuple[int, int]:
        """(other members on this node, members on other nodes) of ``group`` (None: the world)."""
        key = "world" if group is None else group
        if key not in self._split:
            ranks = range(self.world) if group is None else dist.get_process_group_ranks(group)
            mine = self.node(self.rank)
            near = sum(1 for r in ranks if r != self.rank and self.node(r) == mine)
            far = sum(1 for r in ranks if self.node(r) != mine)
            self._split[key] = (near, far)
        return self._split[key]

    # ------------------------------------------------------------------ what a call moved
    def to_each_peer(self, group, nbytes: float) -> None:
        """This rank sent ``nbytes`` to every other member of ``group``."""
        near, far = self.split(group)
        self.counts["intra"] += int(near * nbytes)
        self.counts["inter"] += int(far * nbytes)

    def all_gather(self, group, shard_bytes: int) -> None:
        self.to_each_peer(group, shard_bytes)

    def reduce_scatter(self, group, chunk_bytes: int) -> None:
        self.to_each_peer(group, chunk_bytes)

    def all_to_all(self, group, chunk_bytes: int) -> None:
        self.to_each_peer(group, chunk_bytes)

    def all_reduce(self, group, nbytes: int) -> None:
        near, far = self.split(group)
        n = near + far + 1
        if n > 1:
            self.to_each_peer(group, 2 * nbytes / n)

    def broadcast(self, group, nbytes: int, src: int) -> None:
        """From global rank ``src`` to the rest of ``group``: the root sends it to each peer."""
        if self.rank == src:
            self.to_each_peer(group, nbytes)

    def send(self, peer: int, nbytes: int) -> None:
        """Point to point, to global rank ``peer``."""
        side = "intra" if self.node(peer) == self.node(self.rank) else "inter"
        self.counts[side] += int(nbytes)

    def take(self) -> dict[str, int]:
        """The counts so far, and start again from zero (once per step)."""
        out, self.counts = self.counts, {"intra": 0, "inter": 0}
        return out


def count(traffic: Traffic | None, kind: str, group, nbytes: int) -> None:
    """``traffic.<kind>(group, nbytes)`` when counting is on (call sites hold an optional one)."""
    if traffic is not None:
        getattr(traffic, kind)(group, nbytes)
