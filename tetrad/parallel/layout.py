"""``ResolvedLayout``: the parallel layout resolved once, as every part of the engine uses it.

Built from the strategy and the mesh right after the mesh exists, and handed to the
tensor/sequence plan, recompute, the pipeline, ZeRO and the checkpoint layout record, so no
part re-derives "is tp on", "how is the sequence split" or "which ranks average gradients"
from the strategy. Immutable; its process groups come from the mesh (and one flattened group,
dp x cp x sp, made here with ``new_subgroups_by_enumeration`` on every rank). ``nodes`` is the
gradient group's split by node (``tetrad.parallel.nodes``: hybrid sharding, hpZ and qgZ
groups, and the collectives' byte counter).

How a sequence is split: context parallelism first (rank r of cp holds chunks r and
2cp-1-r of 2cp under the load balance, chunk r of cp without), then Ulysses sp takes a
contiguous slice of that, then Megatron-SP shards between tensor-parallel regions. Token ids
and labels are split by ``shard_tokens``; the positions of a rank's tokens (RoPE, learned
positions) are ``positions`` of the sp-local sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from tetrad.parallel.context import local_positions, shard_sequence
from tetrad.parallel.mesh import ParallelDims
from tetrad.parallel.nodes import NodeSplit, build_node_split
from tetrad.parallel.pipeline.p2p import ring_channels


@dataclass(frozen=True)
class ResolvedLayout:
    dims: ParallelDims
    megatron_sp: bool = False
    zero: int = 0
    compute_dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")  # this rank's compute device
    mesh: DeviceMesh | None = None   # None: a layout only checked, never run
    grad_group: object | None = None  # dp x cp x sp: ranks that see different tokens of one replica
    p2p_channels: dict | None = None  # pp > 1: one communicator per (sender, receiver) stage pair
    cp_load_balance: bool = True
    nodes: NodeSplit | None = None    # the gradient group by node; None: a layout never run

    @classmethod
    def build(cls, strategy, world: int, device: torch.device, dtype: torch.dtype,
              ranks_per_node: int | None = None) -> "ResolvedLayout":
        """``ranks_per_node``: the launcher's (``strategy.ranks_per_node`` wins when given;
        neither: the world is one node)."""
        dims = ParallelDims(world, pp=strategy.pp, dp=strategy.resolve_dp(world), sp=strategy.sp,
                            tp=strategy.tp, cp=strategy.cp)
        mesh = dims.build_mesh(device)
        grad = _token_group(dims) if dims.sp_enabled or dims.cp_enabled else mesh.get_group("dp")
        channels = ring_channels(_pp_lines(dims)) if dims.pp_enabled else None
        nodes = build_node_split(dims, ranks_per_node=strategy.resolve_ranks_per_node(ranks_per_node or world),
                                 dp_shard=strategy.resolve_dp_shard(world), hpz=strategy.zeropp.hpz,
                                 quantize_grads=strategy.zeropp.quantize_grads)
        return cls(dims, strategy.megatron_sp, strategy.zero, dtype, device, mesh, grad, channels,
                   cp_load_balance=strategy.cp_load_balance, nodes=nodes)

    # ------------------------------------------------------------------ degrees
    @property
    def tp(self) -> int:
        return self.dims.tp

    @property
    def sp(self) -> int:
        return self.dims.sp

    @property
    def pp(self) -> int:
        return self.dims.pp

    @property
    def dp(self) -> int:
        return self.dims.dp

    @property
    def cp(self) -> int:
        return self.dims.cp

    @property
    def token_shards(self) -> int:
        """How many ranks split one sequence's tokens before the first block (cp x sp)."""
        return self.cp * self.sp

    def shard_tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's tokens of ``x`` (ids, labels): its cp part, then its sp slice of that."""
        x = shard_sequence(x, dim, self.cp, self.rank("cp"), self.cp_load_balance)
        return x.chunk(self.sp, dim)[self.rank("sp")] if self.sp > 1 else x

    def positions(self, n: int, device=None) -> torch.Tensor:
        """Global positions of this rank's ``n`` local tokens (its sp slice of its cp part; RoPE
        is applied there, before Ulysses' all-to-all gathers the cp-local sequence)."""
        pos = local_positions(n * self.sp * self.cp, self.cp, self.rank("cp"), self.cp_load_balance, device)
        return pos.chunk(self.sp, 0)[self.rank("sp")] if self.sp > 1 else pos

    @property
    def megatron_sp_active(self) -> bool:
        """Megatron-SP is on and means something (it needs tp > 1)."""
        return self.megatron_sp and self.dims.tp_enabled

    @property
    def seq_shards(self) -> int:
        """How many ranks split one sequence between transformer blocks (cp x sp x Megatron-SP tp)."""
        return self.cp * self.sp * (self.tp if self.megatron_sp_active else 1)

    @property
    def scatter_boundaries(self) -> bool:
        """Pipeline boundary tensors are replicated over tp (no Megatron-SP): each tp rank sends
        1/tp of them and the receiver all-gathers."""
        return self.dims.tp_enabled and not self.megatron_sp

    # ------------------------------------------------------------------ groups and ranks
    def group(self, axis: str):
        return self.mesh.get_group(axis)

    def rank(self, axis: str) -> int:
        """This rank's index along a mesh axis (0 on an axis of degree 1)."""
        return self.mesh.get_local_rank(axis) if getattr(self.dims, f"{axis}_enabled") else 0

    @property
    def shard_group(self):
        """The ranks ZeRO shards over: groups of dp_shard under hybrid sharding, else the grad group."""
        return self.nodes.shard_group if self.nodes and self.nodes.shard_group is not None else self.grad_group

    @property
    def spans_nodes(self) -> bool:
        return self.nodes is not None and self.nodes.traffic.spans_nodes

    @property
    def norm_groups(self) -> dict:
        """Where gradient squares are summed beyond ZeRO's group: tp (sharded parameters) and
        pp (each stage its own layers), None on an axis of degree 1; and the byte counter
        those sums (and ZeRO's) are told to (``traffic``)."""
        return {"tp": self.group("tp") if self.dims.tp_enabled else None,
                "pp": self.group("pp") if self.dims.pp_enabled else None,
                "traffic": self.nodes.traffic if self.nodes is not None else None}

    def record(self) -> dict:
        """The layout as a checkpoint records it (RNG states are restored only when equal)."""
        out = {"world_size": self.dims.world_size, "dp": self.dp, "tp": self.tp, "pp": self.pp,
               "sp": self.sp, "zero": self.zero}
        if self.nodes is not None and self.nodes.dp_shard != self.dp:
            out["dp_shard"] = self.nodes.dp_shard
        if self.cp > 1:  # absent at cp 1, so checkpoints written before cp existed still match
            out.update(cp=self.cp, cp_load_balance=self.cp_load_balance)
        return out


def stage_pair_group(dims: ParallelDims, a: int, b: int):
    """The group of this rank's replica at pipeline ranks ``a`` and ``b`` (same dp, cp, sp
    and tp coordinates): tied embeddings sum their gradients over it. Every rank calls this
    (it enumerates every pair); a rank on neither stage gets None."""
    by_key: dict[tuple, list[int]] = {}
    for rank in range(dims.world_size):
        c = dims.coords(rank)
        if c["pp"] in (a, b):
            by_key.setdefault(tuple(v for k, v in c.items() if k != "pp"), []).append(rank)
    group, _ = dist.new_subgroups_by_enumeration(sorted(by_key.values()))
    return group


def _pp_lines(dims: ParallelDims) -> list[list[int]]:
    """Every pipeline line of the world: the global ranks of its stages, in stage order."""
    lines: dict[tuple, list[int]] = {}
    for rank in range(dims.world_size):
        c = dims.coords(rank)
        lines.setdefault((c["dp"], c["cp"], c["sp"], c["tp"]), []).append(rank)
    return [lines[k] for k in sorted(lines)]


def _token_group(dims: ParallelDims):
    """The flattened dp x cp x sp group of this rank: every rank enumerates all of them (the
    public c10d call; DeviceMesh's own flatten is private)."""
    by_key: dict[tuple[int, int], list[int]] = {}
    for rank in range(dims.world_size):
        c = dims.coords(rank)
        by_key.setdefault((c["pp"], c["tp"]), []).append(rank)
    group, _ = dist.new_subgroups_by_enumeration(sorted(by_key.values()))
    return group
