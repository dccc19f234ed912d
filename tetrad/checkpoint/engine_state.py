"""Engine state as pieces, for the plain data-parallel engine (zero: 0).

An engine that shards its state (ZeRO, tp, pp) provides ``engine.state_pieces()`` and
``engine.load_state_pieces(reader)`` itself; this module is the fallback for one that does
not, where every dp rank holds a full replica. Names are layout independent:
``model/<param>``, ``optim/<state key>/<param>`` (exp_avg, exp_avg_sq), ``optim/step`` and
``engine/step_count`` — the names tetrad.zero uses, so a sharded engine can load what this
one saved and vice versa.
Only dp rank 0 writes the replicated tensors; every rank writes its own RNG state.
"""

from __future__ import annotations

import torch

from tetrad.checkpoint.pieces import Piece

STEP_COUNT = "engine/step_count"
OPTIM_STEP = "optim/step"  # one scalar: every parameter has taken the same number of steps


def _param_names(engine) -> dict[int, str]:
    return {id(p): name for name, p in engine.model.named_parameters()}


def engine_state_pieces(engine) -> list[Piece]:
    """Parameters, optimizer state, the optimizer's step and the engine's step counter."""
    write = getattr(engine, "dp_rank", 0) == 0
    pieces = [Piece(f"model/{n}", p.detach(), tuple(p.shape), write=write)
              for n, p in engine.model.named_parameters()]
    names, step = _param_names(engine), 0.0
    for group in engine.optimizer.param_groups:
        for p in group["params"]:
            for key, value in sorted(engine.optimizer.state.get(p, {}).items()):
                if key == "step":  # the same on every parameter: saved once, as tetrad.zero does
                    step = float(value)
                elif torch.is_tensor(value) and value.shape == p.shape:
                    pieces.append(Piece(f"optim/{key}/{names[id(p)]}", value.detach(), tuple(p.shape),
                                        write=write))
    return pieces + [Piece(OPTIM_STEP, torch.tensor(step, dtype=torch.float32), (), write=write),
                     Piece(STEP_COUNT, torch.tensor(engine.step_count, dtype=torch.int64), (), write=write)]


def load_engine_state(engine, reader) -> None:
    """Fill parameters, optimizer state and the step counters from ``reader`` (a CheckpointReader).

    The optimizer state is created from the checkpoint's dtypes first (a fresh optimizer has
    none until its first step), with ``step`` where torch's AdamW keeps it (on the parameter's
    device for fused/capturable, else a CPU scalar).
    """
    reader.fill([Piece(f"model/{n}", p.detach(), tuple(p.shape)) for n, p in engine.model.named_parameters()])
    names, pieces, steps = _param_names(engine), [], []
    scalar = torch.zeros((), dtype=torch.float32)
    for group in engine.optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            state = engine.optimizer.state[p]
            for key in _saved_state_keys(reader, names[id(p)]):
                name = f"optim/{key}/{names[id(p)]}"
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
