"""Dropout randomness under tensor and sequence parallelism.

Ranks that hold *different* data (tensor-parallel heads, sequence shards) must draw their own
dropout masks, while ranks that hold the same replicated activations must draw the same one
(else the replicas diverge). Like Megatron-LM's model-parallel RNG tracker, but stateless.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class RNGFork:
    """Randomness for regions whose ranks hold *different* data (tensor-parallel heads, sequence
    shards): each rank must draw its own dropout mask, while replicated regions must draw the
    same one on every rank (else the replicas diverge).

    Like Megatron's model-parallel RNG tracker, but the forked seed is drawn from the default
    generator at each use (identical on all ranks of the group, since the default stream is
    shared) and offset by this rank's index: the fork is then a pure function of the default
    RNG state, so activation recomputation, which restores that state, replays the same masks
    without knowing about this class.
    """

    def __init__(self, offset: int, device: torch.device):
        self.offset = 2718 + offset  # Megatron's constant keeps forked seeds away from the base seed
        self.device = device

    @contextlib.contextmanager
    def fork(self):
        draw = int(torch.randint(0, 2**62, (1,)).item())
        devices = [] if self.device.type == "cpu" else [self.device]
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed((draw + self.offset) % 2**63)
            yield


class ForkedRNG(nn.Module):
    """Runs `inner` (a dropout, an attention core) under `fork`; adds no parameters or names."""

    def __init__(self, inner: nn.Module, fork: RNGFork):
        super().__init__()
        self.inner, self._fork = inner, fork

    def forward(self, *args, **kwargs):
        with self._fork.fork():
            return self.inner(*args, **kwargs)
