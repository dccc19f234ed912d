"""Publishing: the compute parameters take the values of the updated fp32 masters.

One rule per way ZeRO holds parameters, called by the resident optimizer and by every
offload step mode alike (they say *when* they publish, the stage decides *how*):

* replicated (stages 0-2; every rank holds the whole group in ``g.full``): a shard that is
  the whole group (group world 1: stage 0, or any stage at dp 1) is copied in place. Else the
  rank's updated shard is staged in the compute dtype and all-gathered into ``g.full`` --
  as soon as the whole shard is staged when published ``NOW`` (one group's gather overlaps
  the next group's update), otherwise in ``finish``: collectives never run off the main
  thread (gloo and NCCL need every rank to issue them in one order from one thread), and a
  running forward must not see half-updated parameters.
* sharded (stage 3): the shard store is written at once (``NOW``, or ``AFTER_USE``: nothing
  reads the range until the next forward gathers it); values published ``IN_USE`` (a
  forward is running: ZeRO-Offload's delayed update) are staged and written in ``finish``.

Staging buffers live for one step only, as the resident stages 1-2 always did: holding them
would add 2Ψ/N bytes per rank to the paper's accounting.
"""

from __future__ import annotations

import torch

from tetrad.zero.comm import all_gather
from tetrad.zero.flat import FlatGroup
from tetrad.zero.tier import ShardStore, When


def copy_unless_same(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``, skipped when both are the same memory (fp32 masters that *are*
    the compute shard)."""
    if dst.data_ptr() != src.data_ptr() or dst.dtype != src.dtype:
        dst.copy_(src)


class _Staging:
    """Per-group compute-dtype buffers filled piece by piece during one step."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.buffers: dict[int, tuple[FlatGroup, torch.Tensor]] = {}
        self.filled: dict[int, int] = {}

    def add(self, g: FlatGroup, lo: int, values: torch.Tensor, device: torch.device) -> bool:
        """Stage ``values`` at ``lo``; True once the group's whole shard is staged."""
        if g.index not in self.buffers:
            self.buffers[g.index] = (g, torch.empty(g.shard_size, dtype=self.dtype, device=device))
            self.filled[g.index] = 0
        self.buffers[g.index][1][lo:lo + values.numel()].copy_(values)
        self.filled[g.index] += values.numel()
        return self.filled[g.index] == g.shard_size

    def pop(self, index: int) -> tuple[FlatGroup, torch.Tensor]:
        self.filled.pop(index)
        return self.buffers.pop(index)

    def drain(self):
        for index in sorted(self.buffers):
            yield self.pop(index)


class ReplicatedPublisher:
    def __init__(self, group, dtype: torch.dtype, traffic=None):
        self.group, self.traffic = group, traffic
        self._staging = _Staging(dtype)
        self._gathers: list = []  # (handle, source kept alive until the gather is done)

    def put(self, g: FlatGroup, lo: int, values: torch.Tensor, when: When) -> None:
        if g.world == 1 and when is When.NOW:  # the shard is the whole group
            copy_unless_same(g.full[lo:lo + values.numel()], values)
            return
        if self._staging.add(g, lo, values, g.full.device) and when is When.NOW:
            self._launch(*self._staging.pop(g.index))

    def _launch(self, g: FlatGroup, src: torch.Tensor) -> None:
        if g.world == 1:
            g.full.copy_(src)
            return
        # A separate source tensor: gathering a slice of the output into itself is not
        # allowed by every backend.
        self._gathers.append((all_gather(g.full, src, self.group, self.traffic), src))

    def finish(self) -> None:
        for g, src in self._staging.drain():
            self._launch(g, src)
        for handle, _ in self._gathers:
            handle.wait()
        self._gathers.clear()


class ShardedPublisher:
    def __init__(self, shards: ShardStore, dtype: torch.dtype):
        self.shards = shards
        self._staging = _Staging(dtype)

    def put(self, g: FlatGroup, lo: int, values: torch.Tensor, when: When) -> None:
        if when is When.IN_USE:
            device = g.shard.device if g.shard is not None else values.device
            self._staging.add(g, lo, values, device)
            return
        self.shards.write(g, lo, values)

    def finish(self) -> None:
        for g, staged in self._staging.drain():
            self.shards.write(g, 0, staged)
        self.shards.sync()


class ResidentShards:
    """Stage-3 shards kept where ZeRO built them (device memory): ``g.shard`` itself."""

    def adopt(self, g: FlatGroup, shard: torch.Tensor) -> torch.Tensor | None:
        return shard

    def get(self, g: FlatGroup) -> torch.Tensor:
        return g.shard

    def release(self, g: FlatGroup) -> None:
        pass

    def write(self, g: FlatGroup, lo: int, values: torch.Tensor) -> None:
        copy_unless_same(g.shard[lo:lo + values.numel()], values)

    def sync(self) -> None:
        pass
