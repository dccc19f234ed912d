"""Gradient synchronisation, launched from post-accumulate-grad hooks so it overlaps backward.

``FullGrads`` (stages 0 and 1) keeps every gradient: ``param.grad`` is a view into a
persistent flat buffer per group, so autograd accumulates straight into what is
communicated. Stage 0 all-reduces each buffer; stage 1 reduce-scatters it (the same bytes on
the wire as DDP's all-reduce minus its all-gather half, which stage 1 spends on parameters
instead) and keeps only its shard of the result.

``ShardedGrads`` (stages 2 and 3) keeps only the local gradient shard between steps. On the
micro-batch that synchronises, each gradient is copied into its group's flat buffer as soon
as autograd finishes it and then dropped; a full group is reduce-scattered at once and its
buffer freed when the collective completes (at most ``max_inflight`` buffers are alive).
With gradient accumulation the earlier micro-batches accumulate full gradients locally in
``param.grad`` and only the last one communicates, as DeepSpeed does with
``reduce_scatter`` at the accumulation boundary: the same volume per step as without
accumulation, at the cost of full-size gradients during accumulation.

The flat gradient buffers (and, with a tier's sink, the reduced shards) come from a pool
(``tetrad.zero.buffers.Buffers``) rather than a fresh allocation per group and step. In a
group of one rank there is nothing to communicate: the "reduce-scatter" would be a copy, so
the flat buffer *is* the shard (``g.grad_shard``) and nothing is copied.

Under hybrid sharding (``Sharding.replicate``) each reduced shard is then averaged over the
replicas holding the same shard (an all-reduce of 1/N of the gradients, the only gradient
traffic that leaves the shard group); with qgZ (``Sharding.quantize_grads``) the
reduce-scatter is ZeRO++'s hierarchical quantized all-to-all (``tetrad.zero.zeropp``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from tetrad.zero.buffers import Buffers
from tetrad.zero.comm import Done, all_reduce_avg, reduce_scatter_avg
from tetrad.zero.flat import FlatGroup
from tetrad.zero.sharding import Sharding
from tetrad.zero.tier import GradSink
from tetrad.zero.zeropp import quantized_reduce_scatter


@dataclass
class _Sync:
    """One group's progress through the synchronising backward."""

    pending: int = 0                        # parameters whose gradient has not arrived
    packed: set = field(default_factory=set)  # parameter indices already copied (stage 2-3)
    launched: bool = False
    handle: object | None = None
    out: torch.Tensor | None = None         # stage 1: the reduce-scatter's output


class _HookedGrads:
    def __init__(self, groups: list[FlatGroup], group, dtype: torch.dtype, sharding: Sharding | None = None):
        self.groups, self.group, self.dtype = groups, group, dtype
        self.sharding = sharding or Sharding(shard=group)
        self.traffic = self.sharding.traffic
        self.sync = False
        self._where: dict[nn.Parameter, tuple[FlatGroup, int]] = {}
        self._state: dict[int, _Sync] = {g.index: _Sync() for g in groups}
        self._early: set[int] = set()  # groups reduce_now launched this step
        self._final: set[int] = set()  # ids of the parameters reduce_now was told are final
        for g in groups:
            for i, p in enumerate(g.params):
                self._where[p] = (g, i)
                p.register_post_accumulate_grad_hook(self._on_grad)

    def begin_backward(self, sync: bool) -> None:
        self.sync = sync
        if sync:  # (groups already reduced this step keep their collective)
            self._state = {g.index: self._state[g.index] if g.index in self._early
                           else _Sync(pending=len(g.params)) for g in self.groups}

    def reduce_now(self, params) -> None:
        """``params``' gradients are final for this step (a breadth-first pipeline's chunk
        after its last backward): reduce now, before the step's synchronising backward, every
        group all of whose parameters are final by now (a bucket spanning two chunks waits for
        the second), so the collective overlaps the remaining chunks' backward and, at stages
        2-3, the full gradients are freed at once."""
        self._final |= {id(p) for p in params}
        for g in self.groups:
            if g.index in self._early or not all(id(p) in self._final for p in g.params):
                continue
            self._state[g.index] = _Sync()
            for i, p in enumerate(g.params):
                if p.grad is not None:
                    self._arrived(g, i, p)
            self._early.add(g.index)
            self._start(g)

    def _on_grad(self, p: nn.Parameter) -> None:
        if self.sync:
            g, i = self._where[p]
            self._arrived(g, i, p)
            st = self._state[g.index]
            st.pending -= 1
            if st.pending == 0:
                self._start(g)

    def _start(self, g: FlatGroup) -> None:
        self._state[g.index].launched = True
        self._launch(g)

    def _arrived(self, g: FlatGroup, i: int, p: nn.Parameter) -> None:
        pass

    def _across_replicas(self, shard: torch.Tensor) -> None:
        """Hybrid sharding: average the reduced shard over the replicas holding it too."""
        if self.sharding.replicate is not None:
            all_reduce_avg(shard, self.sharding.replicate, self.traffic).wait()

    def finish(self) -> None:
        """Wait for every group; groups some of whose parameters got no gradient go now."""
        if not self.sync:
            return
        for g in self.groups:
            st = self._state[g.index]
            if not st.launched:
                for i, p in enumerate(g.params):
                    if i not in st.packed and p.grad is not None:
                        self._arrived(g, i, p)
                self._start(g)
        for g in self.groups:
            self._retire(g)
        self.sync, self._early, self._final = False, set(), set()


class FullGrads(_HookedGrads):
    def __init__(self, groups: list[FlatGroup], group, dtype: torch.dtype, scatter: bool,
                 sharding: Sharding | None = None):
        super().__init__(groups, group, dtype, sharding)
        self.scatter = scatter
        for g in groups:
            g.grad_full = torch.zeros(g.numel, dtype=dtype, device=g.params[0].device)
            g.grad_shard = g.grad_full[g.lo:g.hi]
        self.attach()

    def attach(self) -> None:
        """Point each ``param.grad`` at its slice of the flat buffer (again after set_to_none)."""
        for g in self.groups:
            for i, p in enumerate(g.params):
                view = g.view(g.grad_full, i)
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    if p.grad is not None:
                        view.copy_(p.grad)
                    p.grad = view

    def begin_backward(self, sync: bool) -> None:
        self.attach()
        super().begin_backward(sync)

    def _launch(self, g: FlatGroup) -> None:
        st = self._state[g.index]
        if self.scatter and g.world == 1:  # the shard is the whole buffer: nothing to move
            st.handle = Done()
        elif self.scatter:
            st.out = torch.empty_like(g.grad_shard)
            st.handle = reduce_scatter_avg(st.out, g.grad_full, self.group, self.traffic)
        else:
            st.handle = all_reduce_avg(g.grad_full, self.group, self.traffic)

    def _retire(self, g: FlatGroup) -> None:
        st = self._state[g.index]
        st.handle.wait()
        st.handle = None
        if st.out is not None:
            g.grad_shard.copy_(st.out)
            st.out = None
        if self.scatter:  # (also a group of one rank, whose shard is the whole buffer)
            self._across_replicas(g.grad_shard)

    def zero_grad(self) -> None:
        for g in self.groups:
            g.grad_full.zero_()


class ShardedGrads(_HookedGrads):
    """``sink`` (a tier's, e.g. tetrad.offload): each reduced shard is handed to it as soon as
    it is ready and not kept here; the shard buffers are then allocated per reduce instead of
    all at once."""

    def __init__(self, groups: list[FlatGroup], group, dtype: torch.dtype, max_inflight: int = 2,
                 sink: GradSink | None = None, sharding: Sharding | None = None):
        super().__init__(groups, group, dtype, sharding)
        self.max_inflight, self.sink = max_inflight, sink
        self.buffers = Buffers(keep=max_inflight + 1)
        self._inflight: list[FlatGroup] = []
        for g in groups:
            g.grad_shard = None if sink is not None else torch.zeros(g.shard_size, dtype=dtype,
                                                                     device=g.params[0].device)

    def reduce_now(self, params) -> None:
        """As ``_HookedGrads.reduce_now``, except with a tier's sink: it takes each reduced
        shard as it is ready, and the pipeline step hands it no learning rate before the
        schedule (``prepare_step``), so its gradients wait for the step's end as before."""
        if self.sink is None:
            super().reduce_now(params)

    def _flat(self, g: FlatGroup) -> torch.Tensor:
        """The group's flat gradient buffer for this backward, zeroed: its own shard when the
        group has one rank and keeps its gradients (the reduction is then the identity)."""
        if g.grad_full is None:
            if g.world == 1 and self.sink is None and not self.sharding.quantize_grads:
                g.grad_full = g.grad_shard.zero_()
            else:
                g.grad_full = self.buffers.take(g.numel, self.dtype, g.params[0].device)
        return g.grad_full

    def _arrived(self, g: FlatGroup, i: int, p: nn.Parameter) -> None:
        g.view(self._flat(g), i).copy_(p.grad)
        self._state[g.index].packed.add(i)
        p.grad = None

    def _launch(self, g: FlatGroup) -> None:
        flat = self._flat(g)  # (zeros if no parameter of the group got a gradient this step)
        sh = self.sharding
        if g.world == 1 and not sh.quantize_grads:
            g.grad_shard = flat
            self._state[g.index].handle = Done()
        else:
            if g.grad_shard is None:
                g.grad_shard = self.buffers.take(g.shard_size, self.dtype, flat.device)
            self._state[g.index].handle = (
                quantized_reduce_scatter(g.grad_shard, flat, sh.intra, sh.inter, self.traffic)
                if sh.quantize_grads else reduce_scatter_avg(g.grad_shard, flat, self.group, self.traffic))
        self._inflight.append(g)
        while len(self._inflight) > self.max_inflight:
            self._retire(self._inflight[0])

    def _retire(self, g: FlatGroup) -> None:
        st = self._state[g.index]
        if st.handle is not None:
            st.handle.wait()
            st.handle = None
            self._across_replicas(g.grad_shard)
            if self.sink is not None:  # the tier takes it now, during backward
                shard, g.grad_shard = g.grad_shard, None
                # pooled again only if the sink has finished reading it: an overlapped step
                # reads it on its thread later, and the next group's gradient must not land there
                done = self.sink.reduced(g, shard)
                if shard is g.grad_full:  # a group of one rank: the flat buffer was the shard
                    g.grad_full = shard if done else None
                elif done:
                    self.buffers.give(shard)
        if g.grad_full is not None and g.grad_full is not g.grad_shard:
            self.buffers.give(g.grad_full)
        g.grad_full = None
        if g in self._inflight:
            self._inflight.remove(g)

    def zero_grad(self) -> None:
        for g in self.groups:
            for p in g.params:
                p.grad = None
