"""Checkpoints into and out of context-parallel layouts, and of tied embeddings across stages.

cp ranks hold whole parameters (ZeRO shards them over dp x cp x sp like any other ranks),
so what a cp layout changes in a checkpoint is the layout record (cp, cp_load_balance: RNG
states are restored only under the same layout) and which ranks write. Each resume starts
from step 5 of a 10-step run in a fresh Trainer and must continue the uninterrupted curve
(rtol 1e-5; bitwise under the same layout). One spawned world runs every job in turn.
"""

from __future__ import annotations

import json

import pytest

from harness import run_distributed
from test_checkpoint_reshard import _jobs, _same_curve

TIED = {"arch": "gpt", "n_layers": 2, "n_heads": 4, "tie_embeddings": True}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp")
    d = {k: str(root / k) for k in ("cp", "dp", "tied_pp", "tied_dp")}
    ck = {k: f"{v}/checkpoints/step_00000005" for k, v in d.items()}
    cp2 = {"cp": 2, "micro_batch_size": 4}
    jobs = {
        "cp": {"out": d["cp"], "strategy": {**cp2, "zero": 1}},
        "dp": {"out": d["dp"], "strategy": {"micro_batch_size": 2, "zero": 1}},
        "tied_pp": {"out": d["tied_pp"], "model": TIED, "strategy": {"pp": 2, "micro_batch_size": 2}},
        "tied_dp": {"out": d["tied_dp"], "model": TIED, "strategy": {"micro_batch_size": 2}},
        # resumes
        "cp->dp": {"out": str(root / "r1"), "resume": ck["cp"], "every": 0,
                   "strategy": {"micro_batch_size": 2, "zero": 3}},
        "dp->cp": {"out": str(root / "r2"), "resume": ck["dp"], "every": 0,
                   "strategy": {**cp2, "zero": 3, "cp_load_balance": False}},
        "cp->cp": {"out": str(root / "r3"), "resume": ck["cp"], "every": 0, "strategy": {**cp2, "zero": 1}},
        "tied pp->dp": {"out": str(root / "r4"), "resume": ck["tied_pp"], "every": 0, "model": TIED,
                        "strategy": {"micro_batch_size": 2, "zero": 1}},
        "tied dp->pp": {"out": str(root / "r5"), "resume": ck["tied_dp"], "every": 0, "model": TIED,
                        "strategy": {"pp": 2, "micro_batch_size": 2, "zero": 1}},
    }
    results = run_distributed(_jobs, 2, list(jobs.values()), timeout=400)
    for r in results[1:]:
        assert r == results[0]
    return {**dict(zip(jobs, results[0])), "root": root}


@pytest.mark.slow
@pytest.mark.parametrize("src,dst", [("cp", "cp->dp"), ("dp", "dp->cp"), ("tied_pp", "tied pp->dp"),
                                     ("tied_dp", "tied dp->pp")])
def test_reshard_into_and_out_of_cp_and_tied_stages(world2, src, dst):
    _same_curve(world2[dst], world2[src])


@pytest.mark.slow
def test_same_cp_layout_resumes_bitwise_and_records_cp(world2):
    _same_curve(world2["cp->cp"], world2["cp"], exact=True)
    manifest = json.loads((world2["root"] / "cp" / "checkpoints" / "step_00000005" / "manifest.json").read_text())
    assert manifest["layout"]["cp"] == 2 and manifest["layout"]["cp_load_balance"] is True
    plain = json.loads((world2["root"] / "dp" / "checkpoints" / "step_00000005" / "manifest.json").read_text())
    assert "cp" not in plain["layout"]  # unchanged for layouts without cp (old checkpoints match)
