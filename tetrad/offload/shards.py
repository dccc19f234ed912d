"""Where stage-3 parameter shards rest under ``strategy.offload.params`` (a ``ShardStore``).

``cpu``: ZeRO-Infinity's host tier for parameters: each shard in (pinned) host memory, copied
to the device by the gather. ``nvme``: shards in files (``ParamStore``), read ahead in
execution order. ``none`` keeps ZeRO's own ``ResidentShards``.
"""

from __future__ import annotations

import torch

from tetrad.offload.params import ParamStore
from tetrad.zero.flat import FlatGroup
from tetrad.zero.publish import ResidentShards


class HostShards(ResidentShards):
    def adopt(self, g: FlatGroup, shard: torch.Tensor) -> torch.Tensor:
        if shard.device.type == "cpu":
            return shard  # the device is the host: nothing to move
        return shard.cpu().pin_memory()


class FileShards:
    def __init__(self, params: ParamStore, n_groups: int):
        self.params, self.n_groups = params, n_groups

    def adopt(self, g: FlatGroup, shard: torch.Tensor) -> None:
        self.params.adopt(g.index, shard.cpu())  # the files take host tensors
        return None  # the group keeps no copy

    def get(self, g: FlatGroup) -> torch.Tensor:
        return self.params.shard(g.index)

    def release(self, g: FlatGroup) -> None:
        self.params.release(g.index)

    def write(self, g: FlatGroup, lo: int, values: torch.Tensor) -> None:
        self.params.update(g.index, values, lo)

    def invalidate(self, index: int) -> None:
        self.params.invalidate(index)

    def sync(self) -> None:
        for i in range(self.n_groups):
            self.params.invalidate(i)
        self.params.end_trace()

    def flush(self) -> None:
        self.params.flush()
