"""State pieces: save at dp=2 ZeRO-3, load into dp=4 ZeRO-1, training continues identically.

The fill used here is a minimal in-memory stand-in for the checkpoint module's: full tensors
assembled from the written pieces, then each wanted piece cut out of them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from harness import run_distributed

MODEL = {"arch": "llama", "vocab_size": 128, "d_model": 32, "n_layers": 2, "n_heads": 4,
         "n_kv_heads": 2, "seq_len": 16}
GLOBAL, SAVE_AT, STEPS = 8, 3, 6


def _batch(step: int, rank: int, world: int):
    tokens = torch.randint(0, 128, (GLOBAL, 17), generator=torch.Generator().manual_seed(step))
    local = tokens.chunk(world)[rank]
    return local[:, :-1], local[:, 1:]


def _engine(world: int, stage: int, mbs: int):
    from tetrad.config.schema import OptimizerConfig
    from tetrad.models import build_model
    from tetrad.engine import Engine

    return Engine(build_model(MODEL, seed=0), strategy={"zero": stage, "micro_batch_size": mbs},
                  optim_cfg=OptimizerConfig(lr=1e-2, warmup_steps=2), global_batch_size=GLOBAL,
                  total_steps=STEPS)


def _box_view(full: torch.Tensor, piece) -> torch.Tensor:
    box = full[tuple(slice(o, o + s) for o, s in zip(piece.box_offsets, piece.box_shape))]
    return box.reshape(-1)[piece.flat_start:piece.flat_start + piece.numel]


def _save(rank: int, world: int) -> dict:
    engine = _engine(world, stage=3, mbs=2)
    losses = [engine.train_step(_batch(s, rank, world)) for s in range(SAVE_AT)]
    # Plain arrays cross the process boundary (a tensor would be shared memory of a rank
    # that is about to exit).
    pieces = [(p.name, p.tensor.detach().numpy().copy(), p.global_shape, p.box_offsets, p.box_shape,
               p.flat_start) for p in engine.state_pieces() if p.write]
    losses += [engine.train_step(_batch(s, rank, world)) for s in range(SAVE_AT, STEPS)]
    return {"pieces": pieces, "losses": losses}


def _load(rank: int, world: int, full: dict) -> list[float]:
    def fill(pieces):
        for p in pieces:
            p.tensor.copy_(_box_view(full[p.name], p).view_as(p.tensor))

    engine = _engine(world, stage=1, mbs=1)
    engine.load_state_pieces(fill)
    assert engine.step_count == SAVE_AT
    return [engine.train_step(_batch(s, rank, world)) for s in range(SAVE_AT, STEPS)]


def _assemble(per_rank: list[dict]) -> dict:
    full, covered = {}, {}
    from tetrad.checkpoint.pieces import Piece

    for result in per_rank:
        for name, array, shape, offsets, box, start in result["pieces"]:
            p = Piece(name, torch.from_numpy(array), shape, offsets, box, start)
            t = full.setdefault(p.name, torch.zeros(p.global_shape, dtype=p.tensor.dtype))
            _box_view(t, p).copy_(p.tensor.reshape(-1))
            covered[p.name] = covered.get(p.name, 0) + p.numel
    for name, t in full.items():  # written exactly once, completely
        assert covered[name] == max(1, math.prod(t.shape)), name
    return full


def test_state_pieces_reshard_zero3_dp2_to_zero1_dp4():
    saved = run_distributed(_save, 2)
    full = _assemble(saved)
    names = set(full)
    assert "optim/step" in names and "engine/step_count" in names
    assert any(n.startswith("optim/exp_avg_sq/layers.1.") for n in names)
    assert "model/layers.0.attn.q_proj.weight" in names  # the plain model's names
    assert float(full["optim/step"]) == SAVE_AT
    resumed = run_distributed(_load, 4, full)
    for losses in resumed:
        np.testing.assert_allclose(losses, saved[0]["losses"][SAVE_AT:], rtol=1e-5)
