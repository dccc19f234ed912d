"""``OffloadedMaster``: ZeRO's master-weight optimizer with its state below the device.

Same contract as ``tetrad.zero.master.MasterOptimizer`` (``step(lr, clip, norm_groups)``,
``optimizer``, ``scaler``), but the fp32 master shards and the optimizer state of every flat
group live in a state tier (``HostState`` for ``cpu``, ``StateSwapper`` files for ``nvme``)
and are brought in one bucket at a time. Numerics are unchanged: the optimizer is the one the
builder makes (torch's fused CPU AdamW for tetrad's config), stepped over one bucket at a time
by giving only that bucket's slot a gradient (torch optimizers skip parameters whose grad is
None), so every bucket sees exactly the kernel and values a resident step would apply.

The unit streamed is a *piece*: a fixed-size slice of one group's shard (AdamW is
elementwise, so a slice stepped on its own is bitwise the slice of the whole), which keeps
the host buffers the size of a piece however large a group is. Each piece has a persistent
empty *slot* tensor that the optimizer knows as its parameter (with its own step counter, all
equal); for the step the slot and its state are pointed (``set_``) at the piece's buffers,
then pointed back at nothing.
"""

from __future__ import annotations

from typing import Callable

import torch

from tetrad.zero.norm import global_grad_norm, reduce_squares

Publish = Callable[[int, torch.Tensor], object]
Piece = tuple[int, int, int]  # (flat group index, lo, hi) within the group's shard


def state_keys(builder, options: list[dict]) -> list[str]:
    """Names of the per-element state tensors the optimizer keeps (Adam: exp_avg,
    exp_avg_sq), found by one step of a throwaway instance on a 4-element tensor."""
    probe = torch.zeros(4)
    opt = builder([{**(options[0] if options else {}), "params": [probe]}])
    probe.grad = torch.zeros(4)
    opt.step()
    return [k for k, v in opt.state[probe].items() if torch.is_tensor(v) and v.shape == probe.shape]


class OffloadedMaster:
    publishes = True  # step() has already written every updated bucket back to the parameters

    def __init__(self, groups, pieces: list[Piece], options: list[dict], builder, *, sharded: bool,
                 dp_group, scaler, tier, keys: list[str], spilled: bool, publish: Publish,
                 finish_publish=None):
        self.groups, self.sharded, self.dp_group, self.scaler = groups, sharded, dp_group, scaler
        self.pieces, self.tier, self.keys, self.spilled = pieces, tier, keys, spilled
        self.publish, self.finish_publish = publish, finish_publish
        self.slots = [torch.empty(0) for _ in pieces]
        self.squares: list[torch.Tensor | None] = [None] * len(groups)
        self._grads: list[torch.Tensor] | None = None
        shard_groups = []
        for i, opts in enumerate(options):
            slots = [s for (gi, _, _), s in zip(pieces, self.slots) if groups[gi].opt_index == i]
            if slots:
                shard_groups.append({**opts, "params": slots})
        self.optimizer = builder(shard_groups)

    # ------------------------------------------------------------------ gradients
    def record_squares(self, i: int, grad: torch.Tensor) -> None:
        """The squared norm of a gradient shard as it goes to the tier (the norm must not
        need a second read of what was spilled)."""
        self.squares[i] = torch.linalg.vector_norm(grad, dtype=torch.float64) ** 2

    def _norm(self, norm_groups) -> torch.Tensor:
        if not self.spilled:  # resident gradients: exactly MasterOptimizer's arithmetic
            self._grads = grads = [g.grad_shard.float() for g in self.groups]
            if self.scaler is not None:
                torch._foreach_mul_(grads, 1.0 / self.scaler.scale)
            return global_grad_norm(self.groups, grads, sharded=self.sharded,
                                    dp_group=self.dp_group, norm_groups=norm_groups)
        sq = torch.zeros(2, dtype=torch.float64)
        for g, s in zip(self.groups, self.squares):
            if s is not None and g.shard_size:
                sq[0 if g.tensor_parallel else 1] += s
        norm = reduce_squares(sq, sharded=self.sharded, dp_group=self.dp_group, norm_groups=norm_groups)
        return norm / self.scaler.scale if self.scaler is not None else norm

    # ------------------------------------------------------------------ step
    def step(self, lr: float | None, grad_clip: float, norm_groups: dict | None) -> tuple[float, bool]:
        """Update every bucket's master in the tier; returns (global grad norm, skipped)."""
        norm = self._norm(norm_groups)
        if not torch.isfinite(norm):  # as MasterOptimizer: every rank skips together
            if self.scaler is not None:
                self.scaler.update(overflow=True)
            self.squares = [None] * len(self.groups)
            return float(norm), True
        coef = grad_clip / (float(norm) + 1e-6) if grad_clip > 0 else 1.0
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        keys = ["master"] + self.keys + (["grad"] if self.spilled else [])
        write = ["master"] + self.keys
        for i, views in self.tier.stream(range(len(self.pieces)), keys=keys, write=write):
            self._step_bucket(i, views, coef)
            self.publish(i, views["master"])
        self._grads = None
        self.squares = [None] * len(self.groups)
        if self.finish_publish is not None:
            self.finish_publish()
        if self.scaler is not None:
            self.scaler.update(overflow=False)
        return float(norm), False

    def _grad(self, i: int, views: dict) -> torch.Tensor:
        if not self.spilled:  # already unscaled by _norm; to the host if it is not there
            gi, lo, hi = self.pieces[i]
            return self._grads[gi][lo:hi].to(views["master"].device)
        grad = views["grad"]
        if self.scaler is not None:
            grad.mul_(1.0 / self.scaler.scale)
        return grad

    @torch.no_grad()
    def _step_bucket(self, i: int, views: dict, coef: float) -> None:
        grad = self._grad(i, views)
        if coef < 1.0:
            grad.mul_(coef)  # the same elementwise product as torch's clip_grad_norm_
        slot = self.slots[i]
        slot.set_(views["master"])
        slot.grad = grad
        state = self.optimizer.state[slot]
        for k in self.keys:
            if k in state:
                state[k].set_(views[k])
        self.optimizer.step()
        for k in self.keys:
            t = state.get(k)
            if t is None:
                continue
            if t.data_ptr() != views[k].data_ptr():  # created by this (first) step
                views[k].copy_(t)
            t.set_()
        slot.grad = None
        slot.set_()

    # ------------------------------------------------------------------ unsupported
    def ensure_state(self) -> None:
        raise NotImplementedError("checkpoint load with strategy.offload.optimizer != 'none' is not "
                                  "implemented yet; train without offload to resume a checkpoint")

    def state_pieces(self):
        raise NotImplementedError("checkpoints with strategy.offload.optimizer != 'none' are not "
                                  "implemented yet; set checkpoint.every=0 or offload.optimizer=none")
