"""Checkpoint pieces of a plain model and torch optimizer: tetrad's checkpoint files for a
training loop that does not use its ``Engine``.

``state`` is anything with ``model``, ``optimizer``, ``step_count`` and (optionally)
``dp_rank``; every data-parallel rank holds a full replica, so only dp rank 0 writes. The names
are tetrad's (``tetrad.checkpoint.pieces``), so a tetrad ``Engine`` under any layout loads
what this saves, and the other way round. (tetrad's own Engine shards its state and provides
``state_pieces`` / ``load_state_pieces`` itself.)
"""

from __future__ import annotations

import torch

from tetrad.checkpoint.pieces import OPTIM_STEP, STEP_COUNT, Piece, model_name, optim_name


def _param_names(engine) -> dict[int, str]:
    return {id(p): name for name, p in engine.model.named_parameters()}


def plain_state_pieces(engine) -> list[Piece]:
    """Parameters, optimizer state, the optimizer's step and the engine's step counter."""
    write = getattr(engine, "dp_rank", 0) == 0
    pieces = [Piece(model_name(n), p.detach(), tuple(p.shape), write=write)
              for n, p in engine.model.named_parameters()]
    names, step = _param_names(engine), 0.0
    for group in engine.optimizer.param_groups:
        for p in group["params"]:
            for key, value in sorted(engine.optimizer.state.get(p, {}).items()):
                if key == "step":  # the same on every parameter: saved once, as tetrad.zero does
                    step = float(value)
                elif torch.is_tensor(value) and value.shape == p.shape:
                    pieces.append(Piece(optim_name(key, names[id(p)]), value.detach(), tuple(p.shape),
                                        write=write))
    return pieces + [Piece(OPTIM_STEP, torch.tensor(step, dtype=torch.float32), (), write=write),
                     Piece(STEP_COUNT, torch.tensor(engine.step_count, dtype=torch.int64), (), write=write)]


def load_plain_state(engine, reader) -> None:
    """Fill parameters, optimizer state and the step counters from ``reader`` (a CheckpointReader).

    The optimizer state is created from the checkpoint's dtypes first (a fresh optimizer has
    none until its first step), with ``step`` where torch's AdamW keeps it (on the parameter's
    device for fused/capturable, else a CPU scalar).
    """
    reader.fill([Piece(model_name(n), p.detach(), tuple(p.shape)) for n, p in engine.model.named_parameters()])
    names, pieces, steps = _param_names(engine), [], []
    scalar = torch.zeros((), dtype=torch.float32)
    for group in engine.optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = engine.optimizer.state[p]
            for key in _saved_state_keys(reader, names[id(p)]):
                name = optim_name(key, names[id(p)])
                state[key] = torch.empty(p.shape, dtype=reader.dtype(name), device=p.device)
                pieces.append(Piece(name, state[key], tuple(p.shape)))
            steps.append((state, p.device if on_device else torch.device("cpu")))
    reader.fill(pieces + [Piece(OPTIM_STEP, scalar, ())])
    for state, device in steps:
        state["step"] = scalar.clone().to(device)
    count = torch.zeros((), dtype=torch.int64)
    reader.fill([Piece(STEP_COUNT, count, ())])
    engine.step_count = int(count)


def _saved_state_keys(reader, param_name: str) -> list[str]:
    suffix = "/" + param_name
    return sorted(name[len("optim/"):-len(suffix)] for name in reader.tensors
                  if name.startswith("optim/") and name.endswith(suffix)
                  and "/" not in name[len("optim/"):-len(suffix)])
