"""RNG states as checkpoint pieces, one per rank (restored only when the layout is unchanged:
under another layout a rank's stream would not correspond to the same data anyway)."""

from __future__ import annotations

import torch

from tetrad.checkpoint.pieces import Piece


def rng_pieces(rank: int) -> list[Piece]:
    """This rank's RNG states as uint8 tensors (restored only when the layout is unchanged)."""
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    return [Piece(f"rng/{kind}/rank_{rank:05d}", t, tuple(t.shape)) for kind, t in states.items()]


def restore_rng(reader, rank: int) -> bool:
    """Set this rank's RNG states from the checkpoint; False if it holds none for this rank."""
    done = False
    for kind, setter in (("torch_cpu", torch.set_rng_state), ("torch_cuda", _set_cuda_rng)):
        name = f"rng/{kind}/rank_{rank:05d}"
        if name in reader.tensors and (kind == "torch_cpu" or torch.cuda.is_available()):
            state = torch.empty(reader.tensors[name]["shape"], dtype=torch.uint8)
            reader.fill([Piece(name, state, tuple(state.shape))])
            setter(state)
            done = True
    return done


def _set_cuda_rng(state: torch.Tensor) -> None:
    torch.cuda.set_rng_state(state)
