"""``Sharding``: the process groups ZeRO runs over and the ZeRO++ switches, as the engine gives them.

ZeRO knows no mesh: the engine builds these from its ``ResolvedLayout`` and hands them in.

* ``shard``: the ranks one copy of the ZeRO state is sharded across. Flat ZeRO: the whole
  gradient group (dp x cp x sp). Hybrid sharding (``strategy.dp_shard``, torch's HSDP, MiCS):
  groups of dp_shard dp ranks (x cp x sp), usually a node.
* ``replicate``: hybrid sharding only: the ranks holding the *same* shard in the other
  dp/dp_shard groups. Gradients are reduce-scattered inside ``shard`` and then all-reduced
  over ``replicate``; everything else (norm, publish, gathers) stays inside ``shard``; in a
  checkpoint only replica 0 writes.
* ``secondary``: hpZ (stage 3): a subgroup of ``shard`` (a node) over which each rank also
  keeps a secondary shard of the parameters, refreshed by every forward gather, so that the
  backward gathers from it without leaving the node.
* ``intra`` / ``inter``: qgZ: the members of ``shard`` on this rank's node, and those with
  this rank's local index on every node (``tetrad.zero.zeropp``).
* ``traffic``: counts every collective's bytes, intra- and inter-node (``tetrad.traffic``).
"""

from __future__ import annotations

from dataclasses import dataclass

from tetrad.traffic import Traffic
from tetrad.zero.comm import group_rank, group_size


@dataclass(frozen=True)
class Sharding:
    shard: object = None
    replicate: object = None
    secondary: object = None
    intra: object = None
    inter: object = None
    quantize_weights: bool = False
    quantize_grads: bool = False
    traffic: Traffic | None = None

    @property
    def replicas(self) -> int:
        return group_size(self.replicate) if self.replicate is not None else 1

    @property
    def replica_rank(self) -> int:
        return group_rank(self.replicate) if self.replicate is not None else 0

    @property
    def hpz(self) -> bool:
        return self.secondary is not None and group_size(self.secondary) > 1

    def check(self, stage: int) -> None:
        """What each switch needs: the rule book says the same for strategies (zeropp.*)."""
        if self.secondary is not None and stage != 3:
            raise ValueError(f"hpZ (a secondary group) needs ZeRO stage 3, got stage {stage}")
        if self.quantize_weights and stage != 3:
            raise ValueError(f"quantized weight gathers (qwZ) need ZeRO stage 3, got stage {stage}")
        if self.quantize_grads and stage < 2:
            raise ValueError(f"quantized gradient reduction (qgZ) needs ZeRO stage 2 or 3, got {stage}")
        if self.quantize_grads and (self.intra is None or self.inter is None):
            raise ValueError("quantized gradient reduction (qgZ) needs the intra- and inter-node groups")
        if self.replicate is not None and stage == 0:
            raise ValueError("hybrid sharding (a replicate group) needs ZeRO stage 1, 2 or 3")
