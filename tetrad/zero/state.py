"""Checkpoint pieces of the master weights and optimizer state this rank owns.

Names are the plain model's (``tetrad.checkpoint.pieces``: ``model/<param>``,
``optim/<state key>/<param>``, one scalar ``optim/step``); each piece is this rank's flat
range of one parameter (its tp box under tensor parallelism). The fp32 masters are the truth
(the compute copy is derived from them). Under stage 0 every dp rank holds the same values,
so only dp rank 0 marks its pieces for writing; ``tetrad.checkpoint.pieces.mark_writers``
then drops the other replicas a model-parallel layout makes.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch

from tetrad.checkpoint.pieces import OPTIM_STEP, Piece, model_name, optim_name, param_piece
from tetrad.zero.flat import FlatGroup


def group_pieces(groups: list[FlatGroup], shards: dict[str, list[torch.Tensor]], write: bool) -> list[Piece]:
    """Pieces of per-group flat shards: ``shards["master"]`` under ``model/``, every other key
    under ``optim/<key>/`` (the tensors are sliced, not copied)."""
    out = []
    for gi, g in enumerate(groups):
        for name, p, start, sl in g.overlaps():
            for key, per_group in shards.items():
                label = model_name(name) if key == "master" else optim_name(key, name)
                out.append(param_piece(label, per_group[gi][sl], p, start, write))
    return out


def step_piece(step: float, write: bool) -> Piece:
    return Piece(OPTIM_STEP, torch.tensor(step, dtype=torch.float32), (), write=write)


def _state_keys(groups: list[FlatGroup], optimizer) -> list[str]:
    for g in groups:
        state = optimizer.state.get(g.master, {})
        keys = [k for k, v in state.items() if torch.is_tensor(v) and v.shape == g.master.shape]
        if keys:
            return keys
    return []


def _step_value(optimizer) -> float:
    for state in optimizer.state.values():
        step = state.get("step")
        if step is not None:
            return float(step)
    return 0.0


def state_pieces(groups: list[FlatGroup], optimizer, *, replicated: bool, rank: int) -> list[Piece]:
    write = rank == 0 or not replicated
    shards = {"master": [g.master for g in groups]}
    for key in _state_keys(groups, optimizer):
        shards[key] = [optimizer.state[g.master][key] for g in groups]
    return group_pieces(groups, shards, write) + [step_piece(_step_value(optimizer), rank == 0)]


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


def converting(fill: Callable[[list[Piece]], None]) -> Callable[[list[Piece]], None]:
    """``fill``, converting optimizer state saved in another dtype (``optimizer.state_dtype``
    fp32 <-> bf16) with a warning. The checkpoint's manifest records every tensor's dtype; a
    reader (``fill``'s object, when it has ``dtype(name)`` and ``tensors``) is asked for each
    piece under ``optim/``, and a piece saved in another floating dtype is read into a
    temporary of that dtype and cast. Anything else keeps the reader's strict check."""
    reader = getattr(fill, "__self__", fill)
    saved_dtype, names = getattr(reader, "dtype", None), getattr(reader, "tensors", None)
    if saved_dtype is None or names is None:
        return fill

    def run(pieces: list[Piece]) -> None:
        swaps = {}
        for i, p in enumerate(pieces):
            if p.name.startswith("optim/") and p.name in names and p.tensor.is_floating_point():
                dtype = saved_dtype(p.name)
                if dtype != p.tensor.dtype and dtype.is_floating_point:
                    swaps[i] = dataclasses.replace(p, tensor=torch.empty(p.tensor.shape, dtype=dtype))
        if swaps:
            kinds = sorted({f"{swaps[i].tensor.dtype} -> {pieces[i].tensor.dtype}" for i in swaps})
            warnings.warn(f"checkpoint optimizer state is stored as {', '.join(kinds)} (optimizer.state_dtype "
                          f"changed): converting {len(swaps)} pieces on load; bf16 state rounds to nearest",
                          RuntimeWarning, stacklevel=2)
        fill([swaps.get(i, p) for i, p in enumerate(pieces)])
        with torch.no_grad():
            for i, tmp in swaps.items():
                pieces[i].tensor.copy_(tmp.tensor)
    return run
