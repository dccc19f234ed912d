"""Stage 3: parameters sharded too; each unit is gathered just before use and freed after.

Each parameter is a view into its group's flat compute buffer, whose *storage* is resized to
zero when the unit is freed and back when it is gathered (FSDP1's trick). Autograd's saved
tensors refer to that same storage, so a unit re-gathered before its backward is exactly
what forward used, with no saved-tensor hooks. The collective writes through a second
tensor aliasing the storage, so it does not bump the parameters' version counters (which
would make autograd reject the saved tensors).

Hooks, all on modules or autograd, none on ``nn.Module`` itself:
forward pre-hook -> gather (wait), prefetch the next unit in forward order;
forward post-hook -> register a pre-backward hook on the outputs, free;
pre-backward (first output gradient) -> gather (wait), prefetch the previous unit;
post-accumulate-grad of the unit's last parameter -> its gradients go to the reduce-scatter
(``ShardedGrads``) and the unit is freed. The forward order is recorded on the first call.

Held spans (``hold`` / ``release``): a caller that runs many passes over the same units in a
row -- a breadth-first pipeline's run of micro-batches through one chunk -- holds those units:
each is gathered once, at its first use in the span (prefetching the next one), and all are
freed once when it ends, instead of around every pass. Memory: the whole span's units are
gathered together by its end (under breadth-first one chunk, 1/v of the stage; the caller
gathers a chunk again for its backward run rather than holding it through the other chunks'
forward and backward runs, which would keep the whole stage gathered). ``gathers`` counts
units gathered (each launched gather of a free unit), for tests and the step's metrics.

The gathered storage's memory comes from a pool (``tetrad.zero.buffers.Storages``: moved into
the group's storage on gather, out of it on free), not a fresh page-faulted allocation per
unit. A group of one rank whose shard stays on the compute device is never gathered or freed:
its shard *is* the whole group, so the parameters are views of it (the gather would be a copy).

ZeRO++ (``tetrad.zero.sharding.Sharding``): with qwZ the gathers from the primary shards are
int8 block-quantized (``zeropp.quantized_all_gather``); with hpZ every gather from the
primary shards (a forward's) also keeps this rank's slice of the gathered parameters in the
secondary group (a node), and the backward's gathers read those secondary shards instead,
so they never leave the node. The secondary copy is exactly what the forward used
(dequantized, under qwZ), so backward recomputes nothing different; it is dropped and
refilled by the next forward, after the step has changed the primary shards. It costs
``numel / secondary size`` compute-dtype elements per group on the device.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from tetrad.device import DeviceCopies
from tetrad.zero.buffers import Storages
from tetrad.zero.comm import all_gather, group_rank, group_size
from tetrad.zero.flat import FlatGroup
from tetrad.zero.sharding import Sharding
from tetrad.zero.stage012 import flat_fp32
from tetrad.zero.tier import Placement
from tetrad.zero.units import UnitSpec
from tetrad.zero.zeropp import quantized_all_gather


class Unit:
    def __init__(self, spec: UnitSpec, groups: list[FlatGroup]):
        self.name, self.groups, self.triggers = spec.name, groups, spec.triggers
        self.params = [p for g in groups for p in g.params]
        self.state = "free"  # free | gathering | full
        self.handles: list = []
        self.in_backward = False
        self.pending = 0
        self.source = "primary"         # which shards the gather in flight reads
        self.secondary_ready = False    # hpZ: this forward's parameters are in the secondary shards
        self.held = False               # inside a hold/release span: no pass frees it


class ShardedParams:
    """Holds stage-3 parameters: each rank keeps its shards (in ``placement.shards``), units
    are gathered around their use by the hooks below."""

    def __init__(self, model: nn.Module, units: list[tuple[UnitSpec, list[FlatGroup]]], *,
                 group, dtype: torch.dtype, placement: Placement, param_init=None,
                 device: torch.device | None = None, sharding: Sharding | None = None):
        self.model, self.group, self.dtype = model, group, dtype
        self.sharding = sharding or Sharding(shard=group)
        self.traffic = self.sharding.traffic
        self.device = device or self.groups_device(units)
        self.copies = DeviceCopies(self.device)  # host shards up, off the compute stream
        self.groups = [g for _, gs in units for g in gs]
        self.units = [Unit(spec, gs) for spec, gs in units]
        # Each group's shard and master go to their tier as soon as they exist, so
        # construction never holds more than one group's state.
        self.shards = placement.shards
        self.storages = Storages()
        self._io: dict[int, torch.Tensor] = {}  # a second tensor on each g.full's storage
        self._whole: set[int] = set()  # groups of one rank whose shard is the group (never gathered)
        self._secondary: dict[int, torch.Tensor] = {}  # hpZ: this rank's slice of each group
        for g in self.groups:
            if param_init is not None:  # deferred init: fill the group just before sharding
                for name, p in zip(g.names, g.params):
                    param_init(name, p)
            self._shard_group(g, placement)
        self.order: list[Unit] | None = None
        self.gathers = 0
        self._span: list[Unit] = []  # the held units, in the order their first pass uses them
        self._recording: list[Unit] | None = None
        model.register_forward_pre_hook(self._root_pre_forward)
        model.register_forward_hook(self._root_post_forward)
        for unit in self.units:
            for module in unit.triggers:
                module.register_forward_pre_hook(lambda m, a, u=unit: self._pre_forward(u))
                module.register_forward_hook(lambda m, a, out, u=unit: self._post_forward(u, out))
            for p in unit.params:  # registered after ShardedGrads' hooks, so runs after them
                p.register_post_accumulate_grad_hook(lambda p, u=unit: self._on_grad(u))

    @staticmethod
    def groups_device(units) -> torch.device:
        return next((g.params[0].device for _, gs in units for g in gs), torch.device("cpu"))

    @torch.no_grad()
    def _shard_group(self, g: FlatGroup, placement: Placement) -> None:
        flat32 = flat_fp32(g)  # where the parameters are: the host, for a model larger than the device
        shard = flat32[g.lo:g.hi].to(device=self.device, dtype=self.dtype, copy=True)
        master = shard if self.dtype == torch.float32 else flat32[g.lo:g.hi].to(self.device, copy=True)
        del flat32
        g.master = placement.adopt_master(g, master)
        g.shard = self.shards.adopt(g, shard)
        plain = not (self.sharding.quantize_weights or self.sharding.hpz)  # (both change what a gather yields)
        if g.world == 1 and plain and g.shard is not None and g.shard.device == self.device:
            self._whole.add(g.index)
            g.full = g.shard
            for i, p in enumerate(g.params):
                p.data = g.view(g.full, i)
            return
        g.full = torch.empty(g.numel, dtype=self.dtype, device=self.device)
        self._io[g.index] = torch.empty(0, dtype=self.dtype, device=self.device).set_(
            g.full.untyped_storage(), 0, (g.numel,))
        for i, p in enumerate(g.params):
            p.data = g.view(g.full, i)
        g.full.untyped_storage().resize_(0)
        if self.sharding.hpz:
            h = group_size(self.sharding.secondary)
            if g.numel % h:
                raise ValueError(f"hpZ secondary group of {h} ranks does not divide group {g.index}'s "
                                 f"{g.numel} elements (it must divide the shard group of {g.world})")
            self._secondary[g.index] = torch.empty(g.numel // h, dtype=self.dtype, device=self.device)

    def _secondary_slice(self, g: FlatGroup) -> torch.Tensor:
        size = self._secondary[g.index].numel()
        lo = group_rank(self.sharding.secondary) * size
        return self._io[g.index][lo:lo + size]

    # ------------------------------------------------------------------ gather / free
    def _gather(self, unit: Unit, wait: bool = True, backward: bool = False) -> None:
        if unit.state == "free":
            secondary = backward and self.sharding.hpz and unit.secondary_ready
            for g in unit.groups:
                if g.index in self._whole:
                    continue
                self.storages.fill(g.full.untyped_storage(), g.numel * g.full.element_size())
                unit.handles.append(self._launch_gather(g, secondary))
            self.gathers += bool(unit.handles)  # (a unit of whole groups gathers nothing)
            unit.state, unit.source = "gathering", "secondary" if secondary else "primary"
        if wait and unit.state == "gathering":
            for handle in unit.handles:
                handle.wait()
            unit.handles, unit.state = [], "full"
            if unit.source == "primary":
                for g in unit.groups:  # a tier's host buffer for the shard can be reused
                    if g.index in self._whole:
                        continue
                    self.shards.release(g)
                    if self.sharding.hpz:
                        self._secondary[g.index].copy_(self._secondary_slice(g))
                unit.secondary_ready = self.sharding.hpz

    def _launch_gather(self, g: FlatGroup, secondary: bool):
        if secondary:  # hpZ: inside the node, from what this step's forward gathered
            return all_gather(self._io[g.index], self._secondary[g.index], self.sharding.secondary,
                              self.traffic)
        shard = self._up(self.shards.get(g))
        gather = quantized_all_gather if self.sharding.quantize_weights else all_gather
        return gather(self._io[g.index], shard, self.group, self.traffic)

    def _up(self, shard: torch.Tensor) -> torch.Tensor:
        """A shard resting on the host (an offload tier) goes up on the side stream; the
        gather, issued in the compute stream's order, waits for it on the device. A pinned
        host shard is read in place: only the optimizer step rewrites it, after the backward
        that consumed this copy."""
        if shard.device == self.device:
            return shard
        up, ready = self.copies.to_device(shard, keep=True)
        self.copies.order_after(ready)
        return up

    def _free(self, unit: Unit) -> None:
        if unit.state == "free":
            return
        self._gather(unit)  # an in-flight prefetch must land before its buffer goes
        for g in unit.groups:
            if g.index not in self._whole:
                self.storages.empty(g.full.untyped_storage())
        unit.state = "free"

    def _neighbour(self, unit: Unit, step: int) -> Unit | None:
        if self.order is None or unit not in self.order:
            return None
        i = self.order.index(unit) + step
        return self.order[i] if 0 <= i < len(self.order) else None

    # ------------------------------------------------------------------ hooks
    def _root_pre_forward(self, module, args) -> None:
        if self.order is None:
            self._recording = []
        for unit in self.units:  # a unit whose parameters got no gradient last time
            unit.in_backward = False
            unit.secondary_ready = False  # the step may have changed the primary shards

    def _root_post_forward(self, module, args, out) -> None:
        if self._recording is not None:
            self.order, self._recording = self._recording, None

    def _pre_forward(self, unit: Unit) -> None:
        self._gather(unit, backward=unit.in_backward)  # in backward: a recomputed forward
        if unit.held:
            self._prefetch_span(unit, backward=unit.in_backward)
        if self._recording is not None:
            if unit not in self._recording:
                self._recording.append(unit)
        elif not unit.in_backward and not unit.held:
            nxt = self._neighbour(unit, +1)
            if nxt is not None:
                self._gather(nxt, wait=False)

    def _post_forward(self, unit: Unit, out) -> None:
        if torch.is_grad_enabled() and not unit.in_backward:
            tensors = [t for t in tree_leaves(out) if torch.is_tensor(t) and t.requires_grad]
            if tensors:
                torch.autograd.graph.register_multi_grad_hook(
                    tensors, lambda grads, u=unit: self._pre_backward(u), mode="any")
        if not unit.in_backward and not unit.held:
            self._free(unit)

    def _pre_backward(self, unit: Unit) -> None:
        unit.in_backward = True
        self._gather(unit, backward=True)
        if unit.held:
            self._prefetch_span(unit, backward=True)
            return
        prev = self._neighbour(unit, -1)
        if prev is not None:
            self._gather(prev, wait=False, backward=True)

    def _on_grad(self, unit: Unit) -> None:
        unit.pending -= 1
        if unit.pending == 0:
            unit.in_backward = False
            if not unit.held:
                self._free(unit)

    # ------------------------------------------------------------------ held spans
    def _owning(self, params) -> list[Unit]:
        wanted = {id(p) for p in params}
        return [u for u in self.units if any(id(p) in wanted for p in u.params)]

    def hold(self, params, backward: bool = False) -> None:
        """Keep the units owning any of ``params`` gathered from their first use until
        ``release(params)``. The first unit's gather starts now and each unit's first use
        prefetches the next (``_span`` order: forward's, or backward's when ``backward``, which
        also makes hpZ read the secondary shards): one ahead, as outside spans, so an offload
        tier's bounded staging buffers are never all asked for at once."""
        units = self._owning(params)
        self._span = units[::-1] if backward else units
        for unit in units:
            unit.held = True
        if units:
            self._gather(self._span[0], wait=False, backward=backward)

    def _prefetch_span(self, unit: Unit, backward: bool) -> None:
        i = next((k for k, u in enumerate(self._span) if u is unit), None)
        if i is not None and i + 1 < len(self._span):
            self._gather(self._span[i + 1], wait=False, backward=backward)

    def release(self, params) -> None:
        """End the span: the units owning ``params`` are freed (their gradients stay in
        ``param.grad`` until reduced: ``DataParallel.reduce_now`` or the step's end)."""
        for unit in self._owning(params):
            unit.held, unit.in_backward = False, False
            self._free(unit)
        self._span = []

    # ------------------------------------------------------------------ step
    def begin_backward(self, sync: bool) -> None:
        for unit in self.units:
            unit.pending = len(unit.params)

    def finish(self) -> None:
        for unit in self.units:  # units some of whose parameters got no gradient
            unit.in_backward = unit.held = False
            self._free(unit)
