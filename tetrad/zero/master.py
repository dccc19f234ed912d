"""fp32 master shards and the optimizer over them: unscale, global norm, clip, step.

The optimizer only ever sees one flat fp32 tensor per flat group (a shard under ZeRO, the
whole group at stage 0), so the same code serves every stage; what differs between stages
is only where the gradient shard comes from and where the updated values go afterwards.
"""

from __future__ import annotations

import torch

from tetrad.zero.builder import Builder
from tetrad.zero.flat import FlatGroup
from tetrad.zero.norm import clip_, global_grad_norm
from tetrad.zero.scaler import DynamicLossScaler


class MasterOptimizer:
    def __init__(self, groups: list[FlatGroup], options: list[dict], builder: Builder, *,
                 sharded: bool, dp_group, scaler: DynamicLossScaler | None):
        self.groups, self.sharded, self.dp_group, self.scaler = groups, sharded, dp_group, scaler
        shard_groups = []
        for i, opts in enumerate(options):
            masters = [g.master for g in groups if g.opt_index == i]
            if masters:
                shard_groups.append({**opts, "params": masters})
        self.optimizer = builder(shard_groups)

    def step(self, lr: float | None, grad_clip: float, norm_groups: dict | None) -> tuple[float, bool]:
        """One update of the masters from the groups' ``grad_shard``; returns (norm, skipped)."""
        grads = [g.grad_shard if g.grad_shard.dtype == torch.float32 else g.grad_shard.float()
                 for g in self.groups]
        if self.scaler is not None:
            torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
        norm = global_grad_norm(self.groups, grads, sharded=self.sharded, dp_group=self.dp_group,
                                norm_groups=norm_groups)
        if not torch.isfinite(norm):  # every rank sees the same all-reduced norm: all skip together
            if self.scaler is not None:
                self.scaler.update(overflow=True)
            return float(norm), True
        clip_(grads, norm, grad_clip)
        for g, grad in zip(self.groups, grads):
            g.master.grad = grad
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        self.optimizer.step()
        for g in self.groups:
            g.master.grad = None
        if self.scaler is not None:
            self.scaler.update(overflow=False)
        return float(norm), False

    def ensure_state(self) -> None:
        """Create the optimizer state (before any step) so a checkpoint can be loaded into it:
        one step with zero gradients at lr 0 leaves the masters unchanged for Adam-like and
        momentum optimizers while building every state tensor in its real dtype and place."""
        if all(self.optimizer.state.get(g.master) for g in self.groups):
            return
        saved = [group["lr"] for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"] = 0.0
        for g in self.groups:
            g.master.grad = torch.zeros_like(g.master)
        self.optimizer.step()
        for g in self.groups:
            g.master.grad = None
        for group, lr in zip(self.optimizer.param_groups, saved):
            group["lr"] = lr
