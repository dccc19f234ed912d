"""Model-state bytes per rank match the ZeRO paper, measured from live tensors two ways.

``engine.memory_report()`` sums the storages the engine holds; ``live_tensor_bytes`` walks
every tensor the garbage collector can see in the rank's process. Both are compared with
the paper's formulas (Adam, K = 12) after a real optimizer step, at rest between steps. The
pooled communication buffers (gathered units and flat gradients, kept for the next step:
``tetrad.zero.buffers``) are not model state: the live-tensor walk sees them, so the test
subtracts what ``DataParallel.buffer_bytes()`` reports.
"""

from __future__ import annotations

import pytest

from harness import run_distributed

MODEL = {"arch": "llama", "vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 4,
         "seq_len": 32}

# bytes per parameter: (replicated part, part divided by N)
EXPECTED = {
    ("bf16", 0): (16, 0), ("bf16", 1): (4, 12), ("bf16", 2): (2, 14), ("bf16", 3): (0, 16),
    ("fp32", 0): (16, 0), ("fp32", 1): (8, 8), ("fp32", 2): (4, 12), ("fp32", 3): (0, 16),
}


def _measure(rank: int, world: int, cases: list[tuple[str, int]]) -> dict:
    import gc

    import torch

    from tetrad.models import build_model
    from tetrad.engine import Engine
    from tetrad.zero import live_tensor_bytes

    out = {}
    for precision, stage in cases:
        gc.collect()
        before = live_tensor_bytes()
        model = build_model(MODEL, seed=0)
        n_params = sum(p.numel() for p in model.parameters())
        buffers = sum(b.untyped_storage().nbytes() for b in model.buffers())
        engine = Engine(model, strategy={"zero": stage, "micro_batch_size": 2},
                        precision=precision, global_batch_size=2 * world)
        tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(rank))
        engine.train_step((tokens[:, :-1], tokens[:, 1:]))
        del tokens
        gc.collect()
        live = live_tensor_bytes() - before - buffers - engine.data_parallel.buffer_bytes()
        out[(precision, stage)] = {"report": engine.memory_report(), "live": live, "psi": n_params,
                                   "comm_buffers": engine.data_parallel.buffer_bytes()}
        del engine, model
    return out


@pytest.fixture(scope="module", params=[2, 4])
def measured(request) -> tuple[int, dict]:
    world = request.param
    return world, run_distributed(_measure, world, list(EXPECTED))[0]


@pytest.mark.parametrize("precision,stage", list(EXPECTED))
def test_memory_matches_paper(measured, precision, stage):
    world, results = measured
    got = results[(precision, stage)]
    rep, share = EXPECTED[(precision, stage)]
    expected = got["psi"] * (rep + share / world)
    assert got["report"]["total"] == pytest.approx(expected, rel=0.05), got["report"]
    # Second, independent measurement: every tensor alive in the process.
    assert got["live"] == pytest.approx(got["report"]["total"], rel=0.05), got


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_memory_categories(measured, precision):
    """Where the bytes are: stage 2 shards gradients, stage 3 also parameters."""
    world, results = measured
    psi = results[(precision, 0)]["psi"]
    size = 2 if precision == "bf16" else 4
    grads = {s: results[(precision, s)]["report"]["grads"] for s in range(4)}
    params = {s: results[(precision, s)]["report"]["params"] for s in range(4)}
    assert grads[1] == pytest.approx(size * psi, rel=0.02)
    assert grads[2] == pytest.approx(size * psi / world, rel=0.02)
    assert params[2] == pytest.approx(size * psi, rel=0.02)
    assert params[3] == pytest.approx(size * psi / world, rel=0.02)
    optim = results[(precision, 1)]["report"]["optimizer"]
    assert optim == pytest.approx(8 * psi / world, rel=0.02)
