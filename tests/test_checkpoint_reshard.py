"""Checkpoints across model-parallel layouts: tp (with Megatron-SP), Ulysses sp and pp.

Each test saves at step 5 of a 10-step run under one layout, resumes under another in a fresh
Trainer and checks steps 6..10 against the uninterrupted run (rtol 1e-5; bitwise when the
layout is unchanged). To keep spawn costs down, all the runs of one world size share one
spawned process group (``_jobs``): sources first, then the resumes that read them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harness import run_distributed
from test_checkpoint_resume import ckpt_config


HF_GPT2 = {"arch": "hf", "hf_model_type": "gpt2", "d_model": 32, "n_layers": 2, "n_heads": 4,
           "n_kv_heads": 4, "seq_len": 32}


def _jobs(rank: int, world: int, jobs: list[dict]) -> list[list[tuple[int, float]]]:
    """Run each job's Trainer in turn on this process group; (step, loss) per job."""
    from tetrad.checkpoint.reader import CheckpointReader
    from tetrad.trainer.trainer import Trainer

    out = []
    for job in jobs:
        cfg = ckpt_config(job["out"], resume=job.get("resume", "auto"), every=job.get("every", 5),
                          dropout=job.get("dropout", 0.0), **job["strategy"])
        cfg["model"].update(job.get("model", {}))
        out.append([(r["step"], r["loss"]) for r in Trainer(cfg).fit()])
        torch.distributed.barrier()
        if rank == 0 and job.get("every", 5):  # written exactly once across the world, completely
            _check_coverage(CheckpointReader(f"{job['out']}/checkpoints/step_00000005"))
    return out


def _check_coverage(reader) -> None:
    """Every saved tensor is covered by its pieces exactly once (no duplicate writers)."""
    for name, entry in reader.tensors.items():
        held = sum(p["numel"] for p in entry["pieces"])
        assert held == max(1, math.prod(entry["shape"])), (name, held, entry["shape"], len(entry["pieces"]))


def _losses(run):
    return [loss for _, loss in run]


def _same_curve(resumed, full, exact=False):
    assert [s for s, _ in resumed] == list(range(6, 11))
    if exact:
        assert resumed == full[5:]
    else:
        np.testing.assert_allclose(_losses(resumed), _losses(full[5:]), rtol=1e-5)


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    """Sources (10 steps, checkpoints at 5 and 10) under tp=2+Megatron-SP, dp=2, Ulysses sp=2,
    pp=2 and tp=2 with dropout, then resumes from their step 5 under other layouts."""
    root = tmp_path_factory.mktemp("w2")
    d = {k: str(root / k) for k in ("tp", "dp", "sp", "pp", "tpdrop", "gpt2tp", "gpt2dp")}
    ck = {k: f"{v}/checkpoints/step_00000005" for k, v in d.items()}
    tp2 = {"tp": 2, "megatron_sp": True, "micro_batch_size": 4}
    pp2 = {"pp": 2, "micro_batch_size": 2}
    jobs = {
        "tp": {"out": d["tp"], "strategy": tp2},
        "dp": {"out": d["dp"], "strategy": {"micro_batch_size": 2, "zero": 1}},
        "sp": {"out": d["sp"], "strategy": {"sp": 2, "micro_batch_size": 4}},
        "pp": {"out": d["pp"], "strategy": pp2},
        "tpdrop": {"out": d["tpdrop"], "strategy": {"tp": 2, "micro_batch_size": 4}, "dropout": 0.1},
        "gpt2tp": {"out": d["gpt2tp"], "model": HF_GPT2, "strategy": {"tp": 2, "micro_batch_size": 4}},
        "gpt2dp": {"out": d["gpt2dp"], "model": HF_GPT2, "strategy": {"micro_batch_size": 4, "zero": 1}},
        # resumes
        "tp->dp": {"out": str(root / "r1"), "resume": ck["tp"], "every": 0,
                   "strategy": {"micro_batch_size": 4, "zero": 2}},
        "dp->tp": {"out": str(root / "r2"), "resume": ck["dp"], "every": 0, "strategy": tp2},
        "sp->dp": {"out": str(root / "r3"), "resume": ck["sp"], "every": 0, "strategy": {"micro_batch_size": 4}},
        "pp->dp": {"out": str(root / "r4"), "resume": ck["pp"], "every": 0, "strategy": {"micro_batch_size": 1}},
        "dp->pp": {"out": str(root / "r5"), "resume": ck["dp"], "every": 0, "strategy": {**pp2, "zero": 1}},
        "pp->pp": {"out": str(root / "r6"), "resume": ck["pp"], "every": 0, "strategy": pp2},
        "tp->tp": {"out": str(root / "r7"), "resume": ck["tpdrop"], "every": 0,
                   "strategy": {"tp": 2, "micro_batch_size": 4}, "dropout": 0.1},
        # HF GPT-2's fused c_attn: a tp shard is q|k|v slices, a box only of the [in, 3, h] frame
        "gpt2 tp->dp": {"out": str(root / "r8"), "resume": ck["gpt2tp"], "every": 0, "model": HF_GPT2,
                        "strategy": {"micro_batch_size": 4, "zero": 1}},
        "gpt2 dp->tp": {"out": str(root / "r9"), "resume": ck["gpt2dp"], "every": 0, "model": HF_GPT2,
                        "strategy": {"tp": 2, "micro_batch_size": 4}},
    }
    results = run_distributed(_jobs, 2, list(jobs.values()), timeout=300)
    for r in results[1:]:
        assert r == results[0]  # every rank reports the same global losses
    return {**dict(zip(jobs, results[0])), "root": root}


@pytest.mark.parametrize("src,dst", [("tp", "tp->dp"), ("dp", "dp->tp"), ("sp", "sp->dp"),
                                     ("pp", "pp->dp"), ("dp", "dp->pp"),
                                     ("gpt2tp", "gpt2 tp->dp"), ("gpt2dp", "gpt2 dp->tp")])
def test_reshard_world2(world2, src, dst):
    _same_curve(world2[dst], world2[src])


@pytest.mark.parametrize("src,dst", [("pp", "pp->pp"), ("tpdrop", "tp->tp")])
def test_exact_resume_same_layout(world2, src, dst):
    """Same layout: bitwise (tp=2 with dropout, so the forked RNG streams must resume too)."""
    _same_curve(world2[dst], world2[src], exact=True)


def test_sources_agree(world2):
    """The uninterrupted curves of the different layouts agree (so each is 'the' curve)."""
    for k in ("tp", "sp", "pp"):
        np.testing.assert_allclose(_losses(world2[k]), _losses(world2["dp"]), rtol=1e-5)
    np.testing.assert_allclose(_losses(world2["gpt2tp"]), _losses(world2["gpt2dp"]), rtol=1e-5)


def test_gpt2_tp_pieces_use_the_fused_frame(world2):
    from tetrad.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(world2["root"] / "gpt2tp" / "checkpoints" / "step_00000005")
    entry = reader.tensors["model/hf.transformer.h.0.attn.c_attn.weight"]
    assert entry["shape"] == [32, 96]  # the logical (HF) shape, whatever the layout
    assert [p.get("frame") for p in entry["pieces"]] == [[32, 3, 32]] * 2


def test_fused_frame_pieces_round_trip(tmp_path):
    """Pieces saved as boxes of a reshaped frame ([4, 3, 2] for a [4, 6] tensor: each of two
    'tp ranks' holds its half of every one of three blocks) load as flat ranges of the logical
    tensor, and back; a frame piece that is not a reshape is refused."""
    from tetrad.checkpoint.manager import CheckpointManager
    from tetrad.checkpoint.pieces import Piece
    from tetrad.checkpoint.reader import CheckpointReader

    full = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    framed = full.view(4, 3, 2)
    halves = [Piece("w", framed[:, :, r:r + 1].contiguous().view(-1), (4, 6), (0, 0, r), (4, 3, 1),
                    frame=(4, 3, 2)) for r in range(2)]
    CheckpointManager(tmp_path / "a", async_save=False).save(1, halves)
    reader = CheckpointReader(tmp_path / "a" / "step_00000001")
    assert reader.tensors["w"]["pieces"][0]["frame"] == [4, 3, 2]
    for start, n in ((0, 24), (5, 11), (23, 1)):
        flat = Piece("w", torch.empty(n), (4, 6), flat_start=start)
        reader.fill([flat])
        assert torch.equal(flat.tensor, full.view(-1)[start:start + n])
    CheckpointManager(tmp_path / "b", async_save=False).save(
        1, [Piece("w", full.view(-1)[:7].clone(), (4, 6)), Piece("w", full.view(-1)[7:].clone(), (4, 6),
                                                                 flat_start=7)])
    back = CheckpointReader(tmp_path / "b" / "step_00000001")
    for r in range(2):
        box = Piece("w", torch.empty(4, 3, 1), (4, 6), (0, 0, r), (4, 3, 1), frame=(4, 3, 2))
        back.fill([box])
        assert torch.equal(box.tensor, framed[:, :, r:r + 1])
    with pytest.raises(ValueError, match="not a reshape"):
        Piece("w", torch.empty(3), (4, 6), frame=(5, 5))


def test_tp2_pp2_to_dp4_zero1(tmp_path):
    """World 4: tp=2 (Megatron-SP) x pp=2 saves, dp=4 ZeRO-1 resumes on the same curve."""
    src = {"out": str(tmp_path / "src"),
           "strategy": {"tp": 2, "pp": 2, "megatron_sp": True, "micro_batch_size": 2}}
    dst = {"out": str(tmp_path / "dst"), "resume": f"{src['out']}/checkpoints/step_00000005", "every": 0,
           "strategy": {"zero": 1, "micro_batch_size": 1}}
    full, resumed = run_distributed(_jobs, 4, [src, dst], timeout=300)[0]
    _same_curve(resumed, full)


def _offload_fit(rank: int, world: int, out: str) -> str:
    from tetrad.config import ConfigError
    from tetrad.trainer.trainer import Trainer

    cfg = ckpt_config(out, micro_batch_size=8, zero=1, offload={"optimizer": "cpu"})
    try:
        Trainer(cfg).fit()
    except ConfigError as e:
        return str(e)
    return "trained"


def test_offloaded_run_trains_and_checkpoints(tmp_path):
    """A checkpointing run with strategy.offload trains and commits its checkpoints (resume
    and reshard of offloaded state: tests/test_checkpoint_offload.py)."""
    msg = run_distributed(_offload_fit, 1, str(tmp_path))[0]
    assert msg == "trained", msg
    assert (tmp_path / "checkpoints" / "step_00000010" / "manifest.json").is_file()


@pytest.mark.slow
def test_hybrid_sharding_and_hpz_reshard_to_flat_and_back(tmp_path):
    """World 4 as two nodes of two (strategy.ranks_per_node 2): checkpoints written under
    dp_shard=2 (replicas across the nodes: one writer per element, checked by _jobs) and
    under hpZ=2 resume under flat ZeRO-1 and tp=2 ZeRO-3; a flat ZeRO-1 checkpoint resumes
    under dp_shard=2 and hpZ=2 (ZeRO-2 with dp_shard too). Every curve is the flat one."""
    node = {"ranks_per_node": 2, "micro_batch_size": 2}
    src = {k: {"out": str(tmp_path / k), "strategy": {**node, **s}} for k, s in (
        ("flat", {"zero": 1}), ("shard", {"zero": 3, "dp_shard": 2}), ("hpz", {"zero": 3, "zeropp": {"hpz": 2}}))}
    ck = {k: f"{v['out']}/checkpoints/step_00000005" for k, v in src.items()}
    dst = {k: {"out": str(tmp_path / k.replace(">", "")), "resume": ck[k.split("-")[0]], "every": 0,
               "strategy": {**node, **s}} for k, s in (
        ("shard->z1", {"zero": 1}), ("hpz->tp2", {"zero": 3, "tp": 2, "micro_batch_size": 4}),
        ("flat->shard", {"zero": 3, "dp_shard": 2}), ("flat->hpz", {"zero": 3, "zeropp": {"hpz": 2}}),
        ("flat->shard_z2", {"zero": 2, "dp_shard": 2}))}
    jobs = {**src, **dst}
    results = run_distributed(_jobs, 4, list(jobs.values()), timeout=400)
    for r in results[1:]:
        assert r == results[0]
    runs = dict(zip(jobs, results[0]))
    for k in ("shard", "hpz"):
        np.testing.assert_allclose(_losses(runs[k]), _losses(runs["flat"]), rtol=1e-5)
    for k in dst:
        _same_curve(runs[k], runs["flat"])
