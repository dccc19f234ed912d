"""What ZeRO needs from the place its state rests in: the contract an offload tier implements.

ZeRO owns the layout (flat groups, shards), the communication and the per-stage rule for
publishing updated values to the compute parameters (``tetrad.zero.publish``). Where the
fp32 masters, the optimizer state, the reduced gradient shards and (stage 3) the parameter
shards *rest* between uses is a ``Tier``'s business. ``build_data_parallel`` is given one
(``ResidentTier`` when none: everything in device memory, today's ZeRO) and drives it in one
fixed order, each step returning a complete object:

1. ``tier.place(groups, ...)`` -> a ``Placement`` for these groups (files laid out, buffers
   sized; a full disk fails here, before a single step);
2. ``placement.adopt_master(g, master)`` and, at stage 3, ``placement.shards.adopt(g, shard)``
   for each group as soon as it is built: the tier takes what it keeps and says what the
   group itself should still hold, so construction never holds more than one group's state;
3. ``placement.masters()`` -> the ``MasterStore`` that steps the optimizer;
4. during backward, ``placement.sink`` (stages 2-3, when not None) receives each reduced
   gradient shard.

``tetrad.offload`` implements these for host memory and NVMe files; nothing in this package
imports it.
"""

from __future__ import annotations

import enum
from typing import Callable, Protocol

import torch

from tetrad.zero.flat import FlatGroup


class When(enum.Enum):
    """When a store publishes values, which decides how a stage may apply them."""

    NOW = "now"              # main thread, no forward or backward running
    AFTER_USE = "after_use"  # another thread; the running backward no longer reads this range
    IN_USE = "in_use"        # another thread; the running forward/backward may still read it


class Publisher(Protocol):
    """ZeRO's per-stage rule for making the compute parameters equal to updated masters
    (see ``tetrad.zero.publish``): a store calls it, and never re-implements it."""

    def put(self, g: FlatGroup, lo: int, values: torch.Tensor, when: When) -> None: ...

    def device(self, g: FlatGroup) -> torch.device:
        """Where the parameters ``put`` for group ``g`` land (so a host tier can send them up
        off the compute stream first)."""
        ...

    def finish(self) -> None: ...


class GradSink(Protocol):
    """Receives a group's reduced (averaged) gradient shard during backward, stages 2-3."""

    def reduced(self, g: FlatGroup, grad: torch.Tensor) -> bool:
        """True when the sink is done reading ``grad`` (ZeRO may reuse its memory for the next
        group's gradient); False when it still reads it later (a thread, or a copy queued on
        another stream): ZeRO then lets go of the tensor instead of pooling it."""


class MasterStore(Protocol):
    """The fp32 masters and the optimizer over them: unscale, global norm, clip, step."""

    optimizer: torch.optim.Optimizer
    scaler: object | None

    def prepare(self, lr: float | None, publisher: Publisher) -> None:
        """Before the synchronising backward (a store may step buckets during it)."""

    def step(self, lr: float | None, grad_clip: float, norm_groups: dict | None,
             publisher: Publisher) -> tuple[float, bool]:
        """Update the masters and publish them; returns (global grad norm, skipped)."""

    def state_pieces(self) -> list: ...

    def load_state_pieces(self, fill: Callable, publisher: Publisher) -> None: ...

    def close(self) -> None: ...


class ShardStore(Protocol):
    """Where stage-3 parameter shards (compute dtype) rest between gathers."""

    def adopt(self, g: FlatGroup, shard: torch.Tensor) -> torch.Tensor | None:
        """A freshly built shard: returns what the group keeps as ``g.shard`` (None: the
        store holds it elsewhere)."""

    def get(self, g: FlatGroup) -> torch.Tensor:
        """The shard to all-gather from (valid until ``release``)."""

    def release(self, g: FlatGroup) -> None: ...

    def write(self, g: FlatGroup, lo: int, values: torch.Tensor) -> None:
        """Updated elements [lo, lo + len(values)) of the shard."""

    def sync(self) -> None:
        """Main thread, after every write of a step."""


class Placement(Protocol):
    shards: ShardStore
    sink: GradSink | None

    def adopt_master(self, g: FlatGroup, master: torch.Tensor) -> torch.Tensor | None:
        """A freshly built fp32 master shard: returns what the group keeps as ``g.master``."""

    def masters(self) -> MasterStore:
        """The store stepping the masters; called once, after every group was adopted."""


class Tier(Protocol):
    def place(self, groups: list[FlatGroup], *, builder, options: list[dict], scaler,
              dp_group, sharded: bool, grads_to_sink: bool, dtype: torch.dtype,
              rank: int, device: torch.device) -> Placement:
        """``grads_to_sink``: gradients are reduce-scattered per group during backward
        (stages 2-3) and may go to ``placement.sink``; otherwise they stay in
        ``g.grad_shard`` (stages 0-1)."""

    def close(self) -> None: ...
