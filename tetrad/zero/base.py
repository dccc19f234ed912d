"""``DataParallel``: the one interface the Engine drives, whatever the ZeRO stage.

Per step the Engine calls ``begin_backward(sync)`` before each micro-batch's backward (sync
on the last), ``scale_loss`` on the loss, then ``finish()``, ``step(lr, clip, norm_groups)``
and ``zero_grad()``. Stages differ in three pluggable parts: where parameters live between
uses (``_publish`` writes updated masters back to them), how gradients are synchronised
(``self.grads``), and therefore how much of the model state a rank holds.
"""

from __future__ import annotations

import torch
from torch import nn

from tetrad.zero.flat import FlatGroup
from tetrad.zero.master import MasterOptimizer
from tetrad.zero.memory import memory_report
from tetrad.zero.state import load_pieces, state_pieces


class DataParallel:
    stage: int

    def __init__(self, model: nn.Module, groups: list[FlatGroup], *, group, dtype: torch.dtype):
        self.model, self.groups, self.group, self.dtype = model, groups, group, dtype
        self.master: MasterOptimizer | None = None  # set by build_data_parallel
        self.grads = None
        self.offload = None  # tetrad.offload.Offload when strategy.offload moves state

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.master.optimizer

    @property
    def scaler(self):
        return self.master.scaler

    @property
    def sharded(self) -> bool:
        return self.stage > 0

    # ------------------------------------------------------------------ per step
    def begin_backward(self, sync: bool) -> None:
        self.grads.begin_backward(sync)

    def prepare_step(self, lr: float | None) -> None:
        """Before the synchronising backward: an offloaded step that runs during backward
        (``strategy.offload.overlap_step``) takes its learning rate here."""
        if self.offload is not None and self.offload.mode == "overlap":
            self.master.prepare(lr)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.scaler is None else self.scaler.scale_loss(loss)

    def finish(self) -> None:
        self.grads.finish()

    def step(self, lr: float | None, grad_clip: float = 0.0,
             norm_groups: dict | None = None) -> tuple[float, bool]:
        """Update the weights; returns (global grad norm before clipping, skipped)."""
        norm, skipped = self.master.step(lr, grad_clip, norm_groups)
        if not skipped and not getattr(self.master, "publishes", False):  # offload publishes per bucket
            self._publish()
        return norm, skipped

    def zero_grad(self) -> None:
        self.grads.zero_grad()

    def _publish(self) -> None:
        """Make the compute parameters equal to the (updated) masters."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state and memory
    def memory_report(self) -> dict[str, int]:
        return memory_report(self.model, self.groups, self.optimizer)

    def close(self) -> None:
        """Release what outlives a step beyond memory: the offload tier's files."""
        if self.offload is not None:
            self.offload.close()

    def state_pieces(self) -> list:
        if self.offload is not None:  # read from the host/NVMe tier (same names and ranges)
            return self.master.state_pieces()
        return state_pieces(self.groups, self.optimizer, replicated=not self.sharded,
                            rank=self._dp_rank())

    def load_state_pieces(self, fill) -> None:
        """``fill(pieces)`` (or an object with a ``fill`` method, e.g. a checkpoint reader)
        fills this rank's pieces in place; the compute parameters are then refreshed."""
        fill = getattr(fill, "fill", fill)
        if self.offload is not None:  # filled on the host, written back to the tier, published
            self.master.load_state_pieces(fill)
            return
        self.master.ensure_state()
        load_pieces(self.groups, self.optimizer, fill, replicated=not self.sharded,
                    rank=self._dp_rank())
        self._publish()

    def _dp_rank(self) -> int:
        from tetrad.zero.comm import group_rank
        return group_rank(self.group)


def init_master(g: FlatGroup, flat32: torch.Tensor, dtype: torch.dtype, compute: torch.Tensor) -> None:
    """The fp32 master shard: the compute shard itself in fp32 training (no second copy,
    hence the paper's 4Ψ+12Ψ/N for fp32 stage 1), else a copy of the *original* fp32 values
    (not the rounded compute copy)."""
    g.master = compute if dtype == torch.float32 else flat32[g.lo:g.hi].clone()


def flat_fp32(g: FlatGroup) -> torch.Tensor:
    """The group's parameters concatenated in fp32, zero padded."""
    flat = torch.zeros(g.numel, dtype=torch.float32, device=g.params[0].device)
    with torch.no_grad():
        for i, p in enumerate(g.params):
            g.view(flat, i).copy_(p.detach())
    return flat
