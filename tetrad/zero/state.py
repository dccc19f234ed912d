"""Checkpoint pieces of the master weights and optimizer state this rank owns.

Names are the plain model's (``model/<param>``, ``optim/<state key>/<param>``, one scalar
``optim/step``); each piece is this rank's flat range of one parameter. The fp32 masters
are the truth (the compute copy is derived from them). Under stage 0 every dp rank holds the
same values, so only dp rank 0 marks its pieces for writing.
"""

from __future__ import annotations

from typing import Callable

import torch

from tetrad.checkpoint.pieces import Piece
from tetrad.zero.flat import FlatGroup


def _piece(name: str, tensor: torch.Tensor, p, flat_start: int, write: bool) -> Piece:
    box = getattr(p, "tp_box", None)  # (offsets, global shape) under tensor parallelism
    if box is None:
        return Piece(name, tensor, tuple(p.shape), flat_start=flat_start, write=write)
    offsets, global_shape = box
    return Piece(name, tensor, tuple(global_shape), box_offsets=tuple(offsets),
                 box_shape=tuple(p.shape), flat_start=flat_start, write=write)


def _tensor_pieces(groups: list[FlatGroup], optimizer, write: bool) -> list[Piece]:
    pieces = []
    for g in groups:
        state = optimizer.state.get(g.master, {})
        keys = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == g.master.shape]
        for name, p, start, sl in g.overlaps():
            pieces.append(_piece(f"model/{name}", g.master[sl], p, start, write))
            for key in keys:
                pieces.append(_piece(f"optim/{key}/{name}", state[key][sl], p, start, write))
    return pieces


def _step_value(optimizer) -> float:
    for state in optimizer.state.values():
        step = state.get("step")
        if step is not None:
            return float(step)
    return 0.0


def state_pieces(groups: list[FlatGroup], optimizer, *, replicated: bool, rank: int) -> list[Piece]:
    write = rank == 0 or not replicated
    step = torch.tensor(_step_value(optimizer), dtype=torch.float32)
    return _tensor_pieces(groups, optimizer, write) + [Piece("optim/step", step, (), write=rank == 0)]


def load_pieces(groups: list[FlatGroup], optimizer, fill: Callable[[list[Piece]], None], *,
                replicated: bool, rank: int) -> None:
    """Ask ``fill`` for exactly the pieces this rank holds; they are views, filled in place."""
    pieces = state_pieces(groups, optimizer, replicated=replicated, rank=rank)
    fill(pieces)
    step = float(pieces[-1].tensor)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].fill_(step)
        elif "step" in state:
            state["step"] = type(state["step"])(step)
