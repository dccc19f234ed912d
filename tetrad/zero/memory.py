"""Bytes of model state a rank holds, measured from the tensors that exist, not computed.

Storages are deduplicated (a ``param.grad`` that is a view into a flat bucket, or an fp32
master that *is* the parameter shard, is counted once, under the first category that holds
it) and taken at their current size (a freed stage-3 parameter's storage has size 0).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from tetrad.zero.flat import FlatGroup


class _Counter:
    def __init__(self):
        self.seen: set[int] = set()

    def __call__(self, tensors: Iterable[torch.Tensor | None]) -> int:
        total = 0
        for t in tensors:
            if t is None or not torch.is_tensor(t):
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in self.seen:
                continue
            self.seen.add(storage.data_ptr())
            total += storage.nbytes()
        return total


def memory_report(model: nn.Module, groups: list[FlatGroup], optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """{"params", "grads", "master", "optimizer", "total"} in bytes for this rank."""
    count = _Counter()
    params = list(model.parameters())
    report = {
        "params": count(params + [g.full for g in groups] + [g.shard for g in groups]),
        "master": count(g.master for g in groups),
        "grads": count([p.grad for p in params] + [g.grad_full for g in groups]
                       + [g.grad_shard for g in groups]),
        "optimizer": count(t for s in optimizer.state.values() for t in s.values()),
    }
    report["total"] = sum(report.values())
    return report


def live_tensor_bytes() -> int:
    """Every tensor storage alive in this process (found through the garbage collector):
    a second, independent measurement to check ``memory_report`` against."""
    import gc

    count = _Counter()
    return count(o for o in gc.get_objects() if torch.is_tensor(o))
