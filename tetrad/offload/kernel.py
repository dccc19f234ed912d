"""``PieceKernel``: the one per-bucket optimizer step every offloaded step mode runs.

The fp32 masters and optimizer state of every flat group live in a state store (host memory
or NVMe files) and are brought in one *piece* at a time: a fixed-size slice of one group's
shard (AdamW is elementwise, so a slice stepped on its own is bitwise the slice of the
whole), which keeps host buffers the size of a piece however large a group is.

Numerics are unchanged: the optimizer is the one the builder makes (torch's fused CPU AdamW
for tetrad's config), stepped over one piece at a time by giving only that piece's slot a
gradient (torch optimizers skip parameters whose grad is None), so every piece sees exactly
the kernel and values a resident step would apply. Each piece has a persistent empty *slot*
tensor that the optimizer knows as its parameter (with its own step counter, all equal); for
the step the slot and its state are pointed (``set_``) at the piece's buffers, then pointed
back at nothing.

The optimizer steps one piece at a time with only that piece's slot in its parameter groups
(a one-slot copy of the slot's group, hyperparameters read at that moment): torch's
optimizers walk every parameter of every group on each ``step()``, so with all slots present a
step of P pieces would cost O(P^2) Python work (about 6 M slot visits per step at 10 B
parameters in 4 M-element pieces).
"""

from __future__ import annotations

import torch

from tetrad.zero.flat import FlatGroup

Piece = tuple[int, int, int]  # (flat group index, lo, hi) within the group's shard


def state_dtypes(builder, options: list[dict]) -> dict[str, torch.dtype]:
    """{name: dtype} of the per-element state tensors the optimizer keeps (Adam: exp_avg,
    exp_avg_sq; bf16 under ``optimizer.state_dtype: bf16``), found by one step of a throwaway
    instance on a 4-element tensor."""
    return {k: v.dtype for k, v in _probe(builder, options[0] if options else {}).items()
            if torch.is_tensor(v) and v.shape == (4,)}


def state_keys(builder, options: list[dict]) -> list[str]:
    return list(state_dtypes(builder, options))


def _probe(builder, opts: dict) -> dict:
    probe = torch.zeros(4)
    opt = builder([{**opts, "lr": 0.0, "params": [probe]}])
    probe.grad = torch.zeros(4)
    opt.step()
    return opt.state[probe]


def pieces_by_group(pieces: list[Piece]) -> dict[int, list[int]]:
    """{group: [indices of its pieces, in order]} for (group, lo, hi) pieces."""
    out: dict[int, list[int]] = {}
    for k, (gi, _, _) in enumerate(pieces):
        out.setdefault(gi, []).append(k)
    return out


class PieceKernel:
    def __init__(self, groups: list[FlatGroup], pieces: list[Piece], options: list[dict], builder):
        self.dtypes = state_dtypes(builder, options)
        self.pieces, self.keys = pieces, list(self.dtypes)
        self._builder, self._options = builder, (options[0] if options else {})
        self.slots = [torch.empty(0) for _ in pieces]
        shard_groups = []
        for i, opts in enumerate(options):
            slots = [s for (gi, _, _), s in zip(pieces, self.slots) if groups[gi].opt_index == i]
            if slots:
                shard_groups.append({**opts, "params": slots})
        self.optimizer = builder(shard_groups)
        self._owner = {id(s): pg for pg in self.optimizer.param_groups for s in pg["params"]}

    @torch.no_grad()
    def step(self, k: int, views: dict[str, torch.Tensor], grad: torch.Tensor, coef: float) -> None:
        """Step piece ``k``: ``views`` holds its ``master`` and state buffers (updated in
        place), ``grad`` its fp32 gradient, ``coef`` the clipping factor (1: none)."""
        if coef < 1.0:
            grad.mul_(coef)  # the same elementwise product as torch's clip_grad_norm_
        slot = self.slots[k]
        slot.set_(views["master"])
        slot.grad = grad
        state = self.optimizer.state[slot]
        for key in self.keys:
            if key in state:
                state[key].set_(views[key])
        self._step_alone(slot)
        for key in self.keys:
            t = state.get(key)
            if t is None:
                continue
            if t.data_ptr() != views[key].data_ptr():  # created by this (first) step
                views[key].copy_(t)
            t.set_()
        slot.grad = None
        slot.set_()

    def _step_alone(self, slot: torch.Tensor) -> None:
        """``optimizer.step()`` over this slot only (same kernel, same hyperparameters, same
        hooks); the full groups are put back even if the step raises."""
        groups = self.optimizer.param_groups
        self.optimizer.param_groups = [{**self._owner[id(slot)], "params": [slot]}]
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = groups

    def step_value(self) -> float | None:
        """The optimizer's step count (all slots step together); None before the first step."""
        for slot in self.slots:
            step = self.optimizer.state.get(slot, {}).get("step")
            if step is not None:
                return float(step)
        return None

    def set_step(self, step: float) -> None:
        """Give every slot state with this step count; the per-element tensors stay empty
        placeholders that ``step`` points at the store's buffers (so the optimizer never
        re-initialises them to zeros). The step's type (a float32 tensor for torch's Adam)
        comes from one step of a throwaway instance."""
        proto = _probe(self._builder, self._options)
        for slot in self.slots:
            state = self.optimizer.state[slot]
            old = state.get("step")
            if torch.is_tensor(old):
                old.fill_(step)
            elif old is not None:
                state["step"] = type(old)(step)
            else:
                ref = proto.get("step")
                state["step"] = ref.clone().fill_(step) if torch.is_tensor(ref) else type(ref)(step)
            for key in self.keys:
                if key not in state:
                    state[key] = torch.empty(0, dtype=proto[key].dtype)
