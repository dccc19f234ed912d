"""Activation memory of one transformer block: measured, and the paper's formulas.

What is measured is the bytes of tensor storage that the block's autograd graph keeps alive
after its forward, for one input: the saved activations, the layer input when the graph holds
it, and whatever a checkpoint keeps for its recomputation. Storages are tracked with a
``TorchDispatchMode`` (every op output) and weak references (alive or freed). Saved-tensor hooks
alone cannot measure this: inside a non-reentrant checkpoint the checkpoint's own hooks take
the tensors (outer hooks never see them), and the inputs a checkpoint keeps are not "saved
tensors" at all. Parameters, buffers and the block output (the next block's input) are not
counted. The profiler uses the same function.
"""

from __future__ import annotations

import gc

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .policy import POLICIES, apply_block_policy, block_policy


def _storage(t: torch.Tensor):
    """A tensor's storage; for a DTensor its local shard's (bench/tp_sp measures torch's
    DTensor tensor parallelism with this same function)."""
    return getattr(t, "_local_tensor", t).untyped_storage()


class _StorageTracker(TorchDispatchMode):
    """Remembers (weak ref, bytes) of every storage an op returns, keyed by its address."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude = exclude
        self.seen: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                st = _storage(t)
                # An address reused after a free overwrites the dead entry, which is right.
                if st.nbytes() and st.data_ptr() not in self.exclude:
                    self.seen[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
        return out

    def alive_bytes(self, skip: set[int]) -> int:
        return sum(n for ptr, (ref, n) in self.seen.items() if ptr not in skip and not ref.expired())


def _ptrs(tensors) -> set[int]:
    return {_storage(t).data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


def graph_bytes(module: nn.Module, sample_input: torch.Tensor) -> int:
    """Bytes the autograd graph of ``module(sample_input)`` keeps alive (see module doc)."""
    exclude = _ptrs(list(module.parameters()) + list(module.buffers()))
    leaf = sample_input.detach().requires_grad_(sample_input.is_floating_point())
    tracker = _StorageTracker(exclude)
    with tracker:
        x = leaf.clone()  # a tracked, non-leaf input: counted only if the graph keeps it
        out = module(x)
    del x
    gc.collect()
    n = tracker.alive_bytes(skip=_ptrs(tree_leaves(out)))
    del out
    return n


def _rng_devices(device: torch.device) -> dict:
    if device.type == "cpu":
        return {"devices": []}
    return {"devices": [device.index or 0], "device_type": device.type}


def measure_layer_activation_bytes(block: nn.Module, sample_input: torch.Tensor,
                                   policies: tuple[str, ...] = POLICIES) -> dict[str, int]:
    """Activation bytes ``block`` keeps for backward under each policy, for ``sample_input``
    ([b, s, h], on the block's device and dtype).

    Runs in training mode (dropout masks count) with the RNG forked, so measuring does not
    change the random stream that training will see; restores the block's policy and mode.
    """
    before, training = block_policy(block), block.training
    block.train()
    try:
        with torch.random.fork_rng(**_rng_devices(sample_input.device)):
            return {p: graph_bytes(apply_block_policy(block, p), sample_input) for p in policies}
    finally:
        apply_block_policy(block, before)
        block.train(training)
