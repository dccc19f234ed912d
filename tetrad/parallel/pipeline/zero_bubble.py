"""Backward split into input gradients (B) and weight gradients (W) for zero-bubble schedules.

How: while a chunk runs forward under ``store.capture()`` (a ``TorchFunctionMode``), every
``F.linear`` whose weight needs a gradient goes through ``_SplitLinear``. Its backward
returns only the input gradient and hands the weight-gradient matmuls (``dW = dYᵀ X``,
``db = Σ dY``) to the store under the current (micro-batch, chunk) key; ``W`` runs them later
and accumulates into ``param.grad``. Everything else (norms, embeddings, tensor-parallel
layers whose weight grads are computed inside their own autograd Function) gets its weight
gradient in B as usual, which is exact and costs little: in a transformer the Linear weight
gradients are the whole of the paper's W (24·s·b·h² per layer).

Why not ``autograd.grad(out, stage_input, retain_graph=True)`` then ``autograd.grad(out,
params)``: the second call walks the whole graph again, recomputing nearly all of B (every
activation gradient upstream of each weight), so W would cost about B + W. Deferring the
matmuls keeps total backward work equal to an ordinary backward, and the graph can be freed
after B.

``defer(fn)`` lets other autograd Functions (the bubble test's sleeping layers) push work to W.
Outside a split backward it runs ``fn`` at once, so models behave the same under any schedule.
"""

from __future__ import annotations

import contextlib
import threading
from collections import defaultdict
from typing import Callable, Hashable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from tetrad.recompute.wrap import is_checkpointed

_local = threading.local()  # the store whose capture() is active in this thread (forward only)


class WeightGradStore:
    """Deferred weight-gradient work, keyed by (micro-batch, chunk)."""

    def __init__(self):
        self.key: Hashable | None = None  # the unit whose backward is running (set by the executor)
        self.work: dict[Hashable, list[Callable[[], None]]] = defaultdict(list)
        self.paused = 0  # > 0 inside a recomputed (checkpointed) module: see exclude_recomputed

    def defer(self, fn: Callable[[], None]) -> None:
        if self.key is None:
            fn()
        else:
            self.work[self.key].append(fn)

    @contextlib.contextmanager
    def backward_of(self, key: Hashable):
        """Work deferred during this block belongs to ``key``."""
        self.key = key
        try:
            yield
        finally:
            self.key = None

    def run(self, key: Hashable) -> None:
        """The W pass of ``key``: run its deferred weight-gradient work."""
        with torch.no_grad():  # outside autograd's backward, grad mode is on: no history for grads
            for fn in self.work.pop(key, ()):
                fn()

    def pending(self) -> list:
        return list(self.work)

    @contextlib.contextmanager
    def capture(self):
        """Route this thread's ``F.linear`` calls through ``_SplitLinear`` (used around forward)."""
        prev = getattr(_local, "store", None)
        _local.store = self
        self.paused = 0  # an early-stopped recompute can skip a forward hook: start balanced
        try:
            with _LinearMode(self):
                yield
        finally:
            _local.store = prev


def exclude_recomputed(store: WeightGradStore, modules) -> None:
    """Do not split Linears inside activation-recomputed modules (call after recompute is applied).

    Recomputation re-runs the forward inside backward, where autograd does not carry
    ``TorchFunctionMode``s: the recomputed Linears would be plain ones and their saved tensors
    would not match the split forward's. So those Linears stay plain in forward too and get
    their weight gradients in B (exact; with full recompute nothing is left for W, with
    selective recompute -- the attention core only -- everything is).
    """
    def pause(*_):
        store.paused += 1

    def resume(*_):
        store.paused -= 1

    for root in modules:
        for m in root.modules():
            if is_checkpointed(m):  # hooks run inside the checkpointed call, in recompute too
                m.register_forward_pre_hook(pause)
                m.register_forward_hook(resume)


def active_store() -> WeightGradStore | None:
    """The store capturing the forward running in this thread, if any."""
    return getattr(_local, "store", None)


def defer(store: WeightGradStore | None, fn: Callable[[], None]) -> None:
    """Run ``fn`` in the W pass of ``store``'s current unit (now if there is none)."""
    if store is None:
        fn()
    else:
        store.defer(fn)


def accumulate(p: torch.Tensor, g: torch.Tensor) -> None:
    """param.grad += g, in place (ZeRO points ``.grad`` at its flat buffers)."""
    if p.grad is None:
        p.grad = g.to(p.dtype)
    else:
        p.grad.add_(g)


class _LinearMode(TorchFunctionMode):
    def __init__(self, store: WeightGradStore):
        super().__init__()
        self.store = store

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and torch.is_grad_enabled() and not self.store.paused:
            x, w = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if isinstance(w, torch.nn.Parameter) and w.requires_grad:
                return _SplitLinear.apply(x, w, b, self.store)
        return func(*args, **kwargs)


class _SplitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, store):
        ctx.save_for_backward(x, weight)
        ctx.bias, ctx.store = bias, store
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        bias = ctx.bias
        gx = gy.matmul(weight) if ctx.needs_input_grad[0] else None

        def weight_grad():
            g2 = gy.reshape(-1, gy.shape[-1])
            accumulate(weight, g2.t().matmul(x.reshape(-1, x.shape[-1])))
            if bias is not None and bias.requires_grad:
                accumulate(bias, g2.sum(0))

        ctx.store.defer(weight_grad)
        return gx, None, None, None
