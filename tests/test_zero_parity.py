"""ZeRO stages 1-3 reproduce one process's fp32 loss curve (and grad norms, with clipping on).

One spawn per world size runs every (stage, accumulation) layout in sequence, so the test
pays process start-up twice rather than twelve times.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness import run_distributed
from test_dp_parity import tiny_config

CLIP = 0.5  # below the first steps' grad norms, so clipping is exercised and must be exact
LAYOUTS = [(stage, accum) for stage in (1, 2, 3) for accum in (False, True)]


def _config(out: str, precision: str = "fp32", **strategy) -> dict:
    cfg = tiny_config(out, **strategy)
    cfg["run"]["precision"] = precision
    cfg["optimizer"]["grad_clip"] = CLIP
    return cfg


def _fit_many(rank: int, world: int, out: str, runs: list[tuple[str, str, dict]]) -> dict:
    from tetrad.trainer.trainer import Trainer

    results = {}
    for name, precision, strategy in runs:
        trainer = Trainer(_config(f"{out}/{name}", precision, **strategy))
        history = trainer.fit()
        results[name] = {"loss": [r["loss"] for r in history],
                         "grad_norm": [r["grad_norm"] for r in history]}
    return results


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = str(tmp_path_factory.mktemp("zref"))
    return run_distributed(_fit_many, 1, out, [("ref", "fp32", {"micro_batch_size": 8})])[0]["ref"]


def _runs(world: int) -> list:
    # Global batch 8: one micro-batch per rank, or micro-batches of 1 (accumulation over 8/world).
    runs = [(f"z{s}_acc{int(a)}", "fp32", {"zero": s, "micro_batch_size": 1 if a else 8 // world})
            for s, a in LAYOUTS]
    if world == 2:
        runs += [(f"z{s}_bf16", "bf16", {"zero": s, "micro_batch_size": 2}) for s in (0, 1, 3)]
    return runs


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict:
    results = {}
    for world in (2, 4):
        out = str(tmp_path_factory.mktemp(f"zero{world}"))
        per_rank = run_distributed(_fit_many, world, out, _runs(world), timeout=400)
        for rank_result in per_rank[1:]:  # every rank reports the same global loss
            assert rank_result == per_rank[0]
        results[world] = per_rank[0]
    return results


def test_clipping_is_active(reference):
    assert max(reference["grad_norm"]) > CLIP
    assert reference["loss"][-1] < reference["loss"][0]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("stage,accum", LAYOUTS)
def test_zero_matches_single_process(reference, layouts, world, stage, accum):
    got = layouts[world][f"z{stage}_acc{int(accum)}"]
    np.testing.assert_allclose(got["loss"], reference["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], reference["grad_norm"], rtol=1e-5)


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_bf16_tracks_fp32(reference, layouts, stage):
    """bf16 parameters/activations with fp32 masters: within 2% of the fp32 curve per step
    over 10 steps (measured: at most 0.21% at stages 0 and 3); the same descent."""
    got = layouts[2][f"z{stage}_bf16"]["loss"]
    np.testing.assert_allclose(got, reference["loss"], rtol=2e-2)
    assert got[-1] < got[0] - 0.5
