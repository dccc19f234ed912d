"""fp32 master shards and the optimizer over them: unscale, global norm, clip, step, publish.

The optimizer only ever sees one flat fp32 tensor per flat group (a shard under ZeRO, the
whole group at stage 0), so the same code serves every stage; what differs between stages
is only where the gradient shard comes from and how the updated values reach the compute
parameters (the stage's ``Publisher``). This is the resident ``MasterStore``
(``tetrad.zero.tier``); ``ResidentTier`` is the tier that keeps everything in device memory.
"""

from __future__ import annotations

from typing import Callable

import torch

from tetrad.zero.builder import Builder
from tetrad.zero.flat import FlatGroup
from tetrad.zero.norm import clip_, global_grad_norm
from tetrad.zero.optim import set_lr
from tetrad.zero.publish import ResidentShards
from tetrad.zero.scaler import DynamicLossScaler
from tetrad.zero.state import load_pieces, state_pieces
from tetrad.zero.tier import Publisher, When


def unscale(grads: list[torch.Tensor], scaler: DynamicLossScaler | None) -> None:
    if scaler is not None:
        torch._foreach_mul_(grads, 1.0 / scaler.scale)


def skip_step(norm: torch.Tensor, scaler: DynamicLossScaler | None) -> bool:
    """True (and the loss scale backs off) when the global norm is not finite: every rank
    sees the same all-reduced norm, so all skip together."""
    finite = bool(torch.isfinite(norm))
    if scaler is not None:
        scaler.update(overflow=not finite)
    return not finite


class MasterOptimizer:
    def __init__(self, groups: list[FlatGroup], options: list[dict], builder: Builder, *,
                 sharded: bool, dp_group, scaler: DynamicLossScaler | None, rank: int,
                 device: torch.device):
        self.groups, self.sharded, self.dp_group, self.scaler = groups, sharded, dp_group, scaler
        self.rank, self.device = rank, device
        shard_groups = []
        for i, opts in enumerate(options):
            masters = [g.master for g in groups if g.opt_index == i]
            if masters:
                shard_groups.append({**opts, "params": masters})
        self.optimizer = builder(shard_groups)

    def prepare(self, lr: float | None, publisher: Publisher) -> None:
        """Nothing to do before backward: the resident step runs after it."""

    def step(self, lr: float | None, grad_clip: float, norm_groups: dict | None,
             publisher: Publisher) -> tuple[float, bool]:
        """One update of the masters from the groups' ``grad_shard``; returns (norm, skipped)."""
        grads = [g.grad_shard if g.grad_shard.dtype == torch.float32 else g.grad_shard.float()
                 for g in self.groups]
        unscale(grads, self.scaler)
        norm = global_grad_norm(self.groups, grads, sharded=self.sharded, dp_group=self.dp_group,
                                norm_groups=norm_groups, device=self.device)
        if skip_step(norm, self.scaler):
            return float(norm), True
        clip_(grads, norm, grad_clip)
        for g, grad in zip(self.groups, grads):
            g.master.grad = grad
        if lr is not None:
            set_lr(self.optimizer, lr)
        self.optimizer.step()
        for g in self.groups:
            g.master.grad = None
        self._publish(publisher)
        return float(norm), False

    def _publish(self, publisher: Publisher) -> None:
        for g in self.groups:
            publisher.put(g, 0, g.master, When.NOW)
        publisher.finish()

    # ------------------------------------------------------------------ checkpoints
    def state_pieces(self) -> list:
        return state_pieces(self.groups, self.optimizer, replicated=not self.sharded, rank=self.rank)

    def load_state_pieces(self, fill: Callable, publisher: Publisher) -> None:
        """``fill(pieces)`` fills this rank's masters and state in place; then published."""
        self._ensure_state()
        load_pieces(self.groups, self.optimizer, fill, replicated=not self.sharded, rank=self.rank)
        self._publish(publisher)

    def _ensure_state(self) -> None:
        """Create the optimizer state (before any step) so a checkpoint can be loaded into it:
        one step with zero gradients at lr 0 leaves the masters unchanged for Adam-like and
        momentum optimizers while building every state tensor in its real dtype and place."""
        if all(self.optimizer.state.get(g.master) for g in self.groups):
            return
        saved = [group["lr"] for group in self.optimizer.param_groups]
        set_lr(self.optimizer, 0.0)
        for g in self.groups:
            g.master.grad = torch.zeros_like(g.master)
        self.optimizer.step()
        for g in self.groups:
            g.master.grad = None
        for group, lr in zip(self.optimizer.param_groups, saved):
            group["lr"] = lr

    def close(self) -> None:
        """Nothing outlives the process but memory."""


class ResidentPlacement:
    """Everything stays where ZeRO built it: masters and stage-3 shards on the device."""

    sink = None

    def __init__(self, groups: list[FlatGroup], options: list[dict], builder: Builder, *,
                 sharded: bool, dp_group, scaler, rank: int, device: torch.device):
        self.groups, self.options, self.builder = groups, options, builder
        self.kw = dict(sharded=sharded, dp_group=dp_group, scaler=scaler, rank=rank, device=device)
        self.shards = ResidentShards()

    def adopt_master(self, g: FlatGroup, master: torch.Tensor) -> torch.Tensor:
        return master

    def masters(self) -> MasterOptimizer:
        return MasterOptimizer(self.groups, self.options, self.builder, **self.kw)


class ResidentTier:
    """The default tier: nothing leaves device memory (plain ZeRO)."""

    def place(self, groups: list[FlatGroup], *, builder, options: list[dict], scaler, dp_group,
              sharded: bool, grads_to_sink: bool, dtype: torch.dtype, rank: int,
              device: torch.device) -> ResidentPlacement:
        return ResidentPlacement(groups, options, builder, sharded=sharded, dp_group=dp_group,
                                 scaler=scaler, rank=rank, device=device)

    def close(self) -> None:
        pass
