"""Checkpoint pieces of the master weights and optimizer state this rank owns.

Names are the plain model's (``model/<param>``, ``optim/<state key>/<param>``, one scalar
``optim/step``); each piece is this rank's flat range of one parameter. The fp32 masters
are the truth (the compute copy is derived from them). Under stage 0 every dp rank holds the
same values, so only dp rank 0 marks its pieces for writing; ``mark_writers`` then drops the
other replicas a model-parallel layout makes (tp-replicated parameters, the scalars), so that
every element of every tensor is written by exactly one rank of the world.

A tensor-parallel parameter's piece is its box of the logical tensor (``p.tp_box``). A fused
projection's shard (HF GPT-2 ``c_attn``: q|k|v each split) is not one box of the logical
tensor but is one box of a reshaped *frame* of it ([in, 3, hidden] for [in, 3*hidden]);
the piece then carries that frame and the reader maps between frames by flat index.
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
    view = getattr(p, "tp_view", None)
    if view is None:
        return Piece(name, tensor, tuple(global_shape), box_offsets=tuple(offsets),
                     box_shape=tuple(p.shape), flat_start=flat_start, write=write)
    # The local tensor reshaped to `view` is a box of `global_shape`, the logical tensor with
    # one dim split in (parts, n): row-major order is the same in both frames.
    return Piece(name, tensor, _unsplit(tuple(p.shape), tuple(view), tuple(global_shape)),
                 box_offsets=tuple(offsets), box_shape=tuple(view), flat_start=flat_start,
                 write=write, frame=tuple(global_shape))


def _unsplit(local: tuple, view: tuple, frame: tuple) -> tuple:
    """The logical global shape: ``frame`` with the dim that ``view`` splits (relative to the
    local shape) merged back."""
    d = next((i for i, (a, b) in enumerate(zip(local, view)) if a != b), len(local) - 1)
    return frame[:d] + (frame[d] * frame[d + 1],) + frame[d + 2:]


def _param_of(name: str) -> str | None:
    """The parameter a piece name belongs to (``model/X``, ``optim/<key>/X``), else None."""
    kind, _, rest = name.partition("/")
    if kind == "model":
        return rest
    if kind == "optim" and "/" in rest:
        return rest.partition("/")[2]
    return None


def mark_writers(pieces: list[Piece], model, *, tp_rank: int, world_rank: int) -> list[Piece]:
    """Make the write flags say "one writer per element across the whole world".

    ZeRO already dedupes over its own (dp or dp x sp) group. On top of that: a parameter that
    tensor parallelism does not shard is the same on every tp rank (tp rank 0 writes it);
    pipeline stages hold disjoint parameters (each writes its own); pieces that belong to no
    parameter (``optim/step``, ``engine/step_count``) are the same everywhere (world rank 0).
    """
    sharded = {n for n, p in model.named_parameters() if getattr(p, "tp_box", None) is not None}
    for piece in pieces:
        param = _param_of(piece.name)
        if param is None:
            piece.write = world_rank == 0
        elif tp_rank != 0 and param not in sharded:
            piece.write = False
    return pieces


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
