"""Activation memory of one transformer block under a tp / Megatron-SP layout: measured, and
Korthikanti et al.'s formulas (arXiv:2205.05198) to compare it with.

Measured = bytes of the distinct storages autograd saves for backward during one block's
forward (``saved_tensors_hooks``), parameters excluded. That is what the formulas count: the
layer input is included because the first norm saves it.
"""

from __future__ import annotations

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's own shard (the benchmark measures torch's DTensor peer too)."""
    return getattr(t, "_local_tensor", t)


def saved_activation_bytes(block: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward of ``block(x)`` (each storage once, parameters not)."""
    params = {_local(p).untyped_storage().data_ptr() for p in block.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = _local(t).untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = block(x)
    del out
    return sum(seen.values())


def korthikanti_bytes(s: int, b: int, h: int, a: int, t: int = 1, megatron_sp: bool = False,
                      attention_core: bool = True) -> float:
    """Per-layer activation bytes at 16 bits: sbh(10 + 24/t + 5as/(ht)), or with Megatron-SP
    (sbh/t)(34 + 5as/h). ``attention_core=False`` drops the 5as/h term (an attention kernel that
    saves no s x s matrices, like selective recomputation)."""
    core = 5 * a * s / h if attention_core else 0.0
    if megatron_sp and t > 1:
        return s * b * h / t * (34 + core)
    return s * b * h * (10 + 24 / t + core / t)
