"""Pipeline parallelism through the Trainer reproduces one process's loss curve (fp32, rtol
1e-5, 10 steps) under every schedule (GPipe, 1F1B, interleaved, ZB-H1, ZB-V, looped
breadth-first), alone and mixed with data, tensor parallelism and ZeRO (1 with tp; 2 and 3,
which the rule book allows with pp). One spawned world runs every layout of its size in turn."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness import run_distributed
from test_dp_parity import tiny_config as dp_config

STEPS = 10
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zero_bubble", 1), ("zero_bubble_v", 1),
             ("breadth_first", 2)]


def tiny_config(output_dir: str, **strategy) -> dict:
    """The data-parallel parity config with 8 layers (enough for pp=4 x 2 virtual stages)."""
    config = dp_config(output_dir, **strategy)
    config["model"].update(n_layers=8, seq_len=16)
    config["optimizer"]["grad_clip"] = 1.0
    return config


def _fit_all(rank: int, world: int, out: str, layouts: list[dict], trace: str | None = None,
             counts: list | None = None) -> list[list[float]]:
    """Each layout's loss curve; ``counts`` (a list) gets, per layout, the pp rank, the ZeRO-3
    units gathered per step and the gradient elements still unreduced (``param.grad``) when
    the schedule is done and the step's reduce begins."""
    from tetrad.trainer.trainer import Trainer

    curves = []
    for i, strategy in enumerate(layouts):
        trainer = Trainer(tiny_config(f"{out}/{i}", **strategy), trace=trace)
        left: list[int] = []
        mid: list[int] = []
        if counts is not None:  # the engine is built inside fit
            build = trainer._build
            trainer._build = lambda: (build(), _count_unreduced(trainer.engine, left, mid))
        records = trainer.fit()
        curves.append([r["loss"] for r in records])
        if counts is not None:
            counts.append((trainer.engine.layout.rank("pp"), [r["pipeline_zero3_gathers"] for r in records],
                           left, mid))
    return curves


def _count_unreduced(engine, left: list[int], mid: list[int]) -> None:
    """Unreduced gradient elements when the step's reduce begins (``left``) and when a run of
    backwards starts on a chunk after another chunk's backwards were done (``mid``)."""
    dp = engine.data_parallel
    finish, hold = dp.finish, dp.hold
    unreduced = lambda: sum(p.grad.numel() for p in engine.model.parameters() if p.grad is not None)  # noqa: E731

    def finishing():
        left.append(unreduced())
        finish()

    def holding(params, backward=False):
        if backward:
            mid.append(unreduced())
        hold(params, backward)
    dp.finish, dp.hold = finishing, holding


def _fit_counting(rank: int, world: int, out: str, layouts: list[dict]):
    counts: list = []
    return _fit_all(rank, world, out, layouts, counts=counts), counts


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    out = str(tmp_path_factory.mktemp("ref"))
    return run_distributed(_fit_all, 1, out, [{"micro_batch_size": 8}])[0][0]


def _check(reference, layouts, curves_by_rank):
    for rank_curves in curves_by_rank:  # every rank reports the same global loss
        for layout, curve in zip(layouts, rank_curves):
            np.testing.assert_allclose(curve, reference, rtol=1e-5, err_msg=str(layout))
    assert reference[-1] < reference[0]


def test_pp4_and_pp2_dp2_every_schedule(reference, tmp_path):
    layouts = [{"pp": 4, "micro_batch_size": 2, "pipeline_schedule": s, "virtual_stages": v}
               for s, v in SCHEDULES]
    layouts += [{"pp": 2, "micro_batch_size": 1, "pipeline_schedule": s, "virtual_stages": v}
                for s, v in SCHEDULES]
    trace = tmp_path / "trace" / "pp.json"  # the engine writes one file per rank
    _check(reference, layouts, run_distributed(_fit_all, 4, str(tmp_path), layouts, str(trace), timeout=240))
    for rank in range(4):  # the last layout (pp=2 x dp=2, breadth_first) wrote last
        events = json.loads((trace.parent / f"pp.rank{rank}.json").read_text())["traceEvents"]
        spans = [e for e in events if e.get("cat") in ("forward", "backward", "weight-grad")]
        assert {e["name"][0] for e in spans} == {"F", "B"} and {e["tid"] for e in spans} == {0, 1}


def test_pp2_dp2_sharded_zero_under_every_schedule(reference, tmp_path):
    """ZeRO-2 and -3 under pipeline schedules (breadth-first is the schedule made for them).

    And what breadth-first saves: 8 layers in 4 chunks of 2, 4 micro-batches per step. Each
    rank holds 2 chunks, 5 or 6 units (stage 0: the embedding + 2 blocks, 2 blocks; stage 1:
    2 blocks, 2 blocks + final norm + head). Breadth-first gathers a chunk once for its run of
    forwards and once for its run of backwards, the rank's last chunk once for both (its two
    runs are adjacent): 3*2 + 2 = 8 units per step on stage 0, 2*2 + 4 = 8 on stage 1, not
    x micro-batches. 1F1B gathers every unit in every forward: at least 5*4 or 6*4. And
    breadth-first reduces each chunk's gradients after its last backward (ZeRO-2 and -3): when
    chunk 0's backwards start, chunk 1's are already reduced (ZeRO-2: but for the one bucket,
    at most 2621 elements, that straddles the two chunks), and none is left when the schedule
    ends; after 1F1B every gradient is."""
    layouts = [{"pp": 2, "zero": z, "micro_batch_size": 1, "pipeline_schedule": s, "virtual_stages": v}
               for z, (s, v) in [(3, ("breadth_first", 2)), (3, ("1f1b", 1)), (2, ("zero_bubble_v", 1)),
                                 (3, ("zero_bubble_v", 1)), (2, ("interleaved", 2)), (2, ("breadth_first", 2))]]
    layouts[5]["bucket_mb"] = 0.01  # ZeRO-2 buckets of ~2.5k elements: most within one chunk
    # shards and optimizer in files: a span's gathers stage through the tier's bounded buffers
    layouts.append({**layouts[0], "offload": {"params": "nvme", "optimizer": "nvme",
                                              "nvme_dir": str(tmp_path / "nvme")}})
    results = run_distributed(_fit_counting, 4, str(tmp_path), layouts, timeout=240)
    _check(reference, layouts, [curves for curves, _ in results])
    for _, counts in results:
        (stage, breadth, bf_left, bf_mid), (_, one_f_one_b, left, _), (_, zero2, _, _) = counts[:3]
        assert breadth == counts[6][1] == [8] * STEPS, (stage, breadth, counts[6][1])
        assert all(g >= (5, 6)[stage] * 4 for g in one_f_one_b), (stage, one_f_one_b)
        assert zero2 == [0] * STEPS  # stage 2 keeps whole parameters: nothing to gather
        z2_left, z2_mid = counts[5][2:]
        assert bf_left == z2_left == [0] * STEPS and min(left) > 0 and len(set(left)) == 1, (left, bf_left)
        assert bf_mid == [0] * STEPS and len(z2_mid) == STEPS and max(z2_mid) <= 2621, (bf_mid, z2_mid)


def test_pp2_tp2_dp2_zero1(reference, tmp_path):
    layouts = [{"pp": 2, "tp": 2, "zero": 1, "micro_batch_size": 2, "pipeline_schedule": s,
                "virtual_stages": v} for s, v in [("1f1b", 1), ("zero_bubble", 1)]]
    _check(reference, layouts, run_distributed(_fit_all, 8, str(tmp_path), layouts, timeout=240))
