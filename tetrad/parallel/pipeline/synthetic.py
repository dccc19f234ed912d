"""A model whose layers take prescribed times, for measuring schedules rather than kernels.

Each layer *sleeps* for its forward (``t_f``), input-gradient (``t_b``) and weight-gradient
(``t_w``) time; under a zero-bubble schedule the weight-gradient sleep is deferred to the W
pass, otherwise it is part of B. Sleeping ranks do not compete for CPU cores, so on a small
shared machine busy time is what the schedule makes it and the measured bubble can be set
beside the papers' formulas. It has the embed / layers / head protocol of tetrad's
Transformer, so ``split_model`` prunes it the same way.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from tetrad.parallel.pipeline.zero_bubble import active_store, defer


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, times):
        ctx.times, ctx.store = times, active_store()
        time.sleep(times[0])
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        _, t_b, t_w = ctx.times
        time.sleep(t_b)
        defer(ctx.store, lambda: time.sleep(t_w))
        return g, None


class SleepBlock(nn.Module):
    def __init__(self, d: int, times: tuple[float, float, float]):
        super().__init__()
        self.proj, self.times = nn.Linear(d, d), times

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(self.proj(x), self.times)


class SleepModel(nn.Module):
    """``n_layers`` sleeping blocks between a tiny embedding and output head."""

    def __init__(self, n_layers: int, times: tuple[float, float, float], vocab: int = 16, d: int = 8,
                 seed: int = 0):
        super().__init__()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.tok_emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(SleepBlock(d, times) for _ in range(n_layers))
        self.lm_head = nn.Linear(d, vocab)
        torch.random.set_rng_state(gen_state)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok_emb(ids)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(h)
