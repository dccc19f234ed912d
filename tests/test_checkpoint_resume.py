"""Training checkpoints on real gloo ranks: exact resume, reshard across dp, real multi-rank pieces."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from harness import run_distributed
from test_dp_parity import tiny_config


def ckpt_config(out: str, resume: str = "auto", every: int = 5, dropout: float = 0.0, **strategy) -> dict:
    cfg = tiny_config(out, **strategy)
    cfg["checkpoint"] = {"every": every, "keep": 3, "async": True, "resume": resume}
    cfg["model"]["dropout"] = dropout
    return cfg


def _fit(rank: int, world: int, config: dict) -> list[tuple[int, float]]:
    from tetrad.trainer.trainer import Trainer

    return [(r["step"], r["loss"]) for r in Trainer(config).fit()]


@pytest.fixture(scope="module")
def dp2_run(tmp_path_factory):
    """Ten uninterrupted steps at dp=2 (with dropout, so RNG state matters), checkpoints at 5 and 10."""
    out = tmp_path_factory.mktemp("dp2")
    losses = run_distributed(_fit, 2, ckpt_config(str(out), dropout=0.1, micro_batch_size=2))[0]
    return out, losses


def test_exact_resume_dp2(dp2_run, tmp_path):
    """A fresh process group resuming from step 5 reproduces steps 6..10 bitwise."""
    out, full = dp2_run
    shutil.copytree(out / "checkpoints" / "step_00000005", tmp_path / "checkpoints" / "step_00000005")
    resumed = run_distributed(_fit, 2, ckpt_config(str(tmp_path), dropout=0.1, micro_batch_size=2))
    assert resumed[0] == full[5:]  # exact (step, loss) equality, fp32 on CPU
    assert resumed[1] == resumed[0]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000005", "step_00000010"]


@pytest.fixture(scope="module")
def plain_runs(tmp_path_factory):
    """No-dropout runs at dp=2 and dp=1 (checkpoints at 5 and 10): sources and reference curves."""
    runs = {}
    for world, mbs, zero in ((2, 2, 1), (1, 8, 0)):
        out = tmp_path_factory.mktemp(f"plain_dp{world}")
        cfg = ckpt_config(str(out), micro_batch_size=mbs, zero=zero)
        runs[world] = out, run_distributed(_fit, world, cfg)[0]
    return runs


@pytest.mark.parametrize("src_world,world,mbs,zero", [(2, 1, 8, 0), (1, 4, 1, 2)])
def test_reshard_to_other_dp(plain_runs, tmp_path, src_world, world, mbs, zero):
    """dp=2 ZeRO-1 -> dp=1 plain, and dp=1 plain -> dp=4 ZeRO-2, on the uninterrupted loss curve:
    flat optimizer shards are cut differently on each side.

    Dropout is off: its draws depend on the layout, and RNG states are (rightly) not
    restored across a layout change.
    """
    out, full = plain_runs[src_world]
    src = out / "checkpoints" / "step_00000005"
    resumed = run_distributed(_fit, world, ckpt_config(str(tmp_path), resume=str(src), every=0,
                                                       micro_batch_size=mbs, zero=zero))[0]
    assert [s for s, _ in resumed] == list(range(6, 11))
    np.testing.assert_allclose([l for _, l in resumed], [l for _, l in full[5:]], rtol=1e-5)


def _save_flat_halves(rank: int, world: int, root: str) -> None:
    """Each real rank holds a ZeRO-style flat share of two tensors and saves it asynchronously."""
    from tetrad.checkpoint.manager import CheckpointManager
    from tetrad.checkpoint.pieces import Piece

    full = torch.arange(7 * 9, dtype=torch.float32).reshape(7, 9)
    per = -(-full.numel() // world)
    a, b = rank * per, min((rank + 1) * per, full.numel())
    mgr = CheckpointManager(root, rank=rank, world_size=world, keep=1, run_id="r", commit_timeout=30)
    for step in (1, 2):
        mgr.save(step, [Piece("m", full.reshape(-1)[a:b].clone() * step, full.shape, flat_start=a),
                        Piece("rep", torch.full((3,), float(step)), (3,), write=rank == 0)], {"s": step})
        mgr.wait_for_snapshot()
    mgr.close()


def test_real_ranks_save_load_into_other_split(tmp_path):
    from tetrad.checkpoint.pieces import Piece
    from tetrad.checkpoint.reader import CheckpointReader

    run_distributed(_save_flat_halves, 3, str(tmp_path))
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000002"]
    reader = CheckpointReader(tmp_path / "step_00000002")
    assert reader.extra == {"s": 2} and reader.manifest["world_size"] == 3
    full = torch.arange(7 * 9, dtype=torch.float32).reshape(7, 9) * 2
    for tp_rank in range(3):  # load as column boxes, as a tp=3 layout would hold them
        box = Piece("m", torch.empty(7, 3), (7, 9), (0, 3 * tp_rank), (7, 3))
        reader.fill([box])
        assert torch.equal(box.tensor, full[:, 3 * tp_rank:3 * tp_rank + 3])
    rep = Piece("rep", torch.empty(3), (3,))
    reader.fill([rep])
    assert torch.equal(rep.tensor, torch.full((3,), 2.0))


def test_plain_loop_state_round_trip(tmp_path):
    """plain_state_pieces / load_plain_state (a loop without tetrad's Engine) restore a
    torch AdamW exactly: the next step from the loaded state equals the next step from the live one."""
    from types import SimpleNamespace

    from tetrad.checkpoint.plain import load_plain_state, plain_state_pieces
    from tetrad.checkpoint.manager import CheckpointManager
    from tetrad.checkpoint.reader import CheckpointReader

    def make():
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
        return SimpleNamespace(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.1),
                               step_count=0, dp_rank=0)

    def train(engine, steps):
        for _ in range(steps):
            engine.model(torch.ones(2, 4)).square().sum().backward()
            engine.optimizer.step()
            engine.optimizer.zero_grad()
            engine.step_count += 1

    live, fresh = make(), make()
    train(live, 3)
    CheckpointManager(tmp_path, async_save=False).save(3, plain_state_pieces(live))
    load_plain_state(fresh, CheckpointReader(tmp_path / "step_00000003"))
    assert fresh.step_count == 3
    train(live, 1)
    train(fresh, 1)
    for a, b in zip(live.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)


def _fit_saying(rank: int, world: int, config: dict) -> tuple[list[tuple[int, float]], str]:
    """(step, loss) per step, and what this rank printed."""
    import contextlib
    import io

    from tetrad.trainer.trainer import Trainer

    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        history = Trainer(config).fit()
    return [(r["step"], r["loss"]) for r in history], text.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 4])
def test_job_restarted_on_another_world_keeps_the_global_batch_and_says_so(plain_runs, tmp_path, world):
    """A dp=2 job requeued on 1 rank (a lost node) or 4 (torchrun --nnodes 1:2 grew): resume
    auto finds its checkpoint, reshards, keeps the global batch of 8 by recomputing the
    gradient accumulation (2 micro-batches of 2 per rank -> 4 or 1), and continues the
    uninterrupted dp=2 curve."""
    out, full = plain_runs[2]
    shutil.copytree(out / "checkpoints" / "step_00000005", tmp_path / "checkpoints" / "step_00000005")
    results = run_distributed(_fit_saying, world, ckpt_config(str(tmp_path), micro_batch_size=2, zero=1))
    resumed, said = results[0]
    assert [s for s, _ in resumed] == list(range(6, 11))
    np.testing.assert_allclose([l for _, l in resumed], [l for _, l in full[5:]], rtol=1e-5)
    assert (f"resuming step 5 saved by world size 2 (dp=2 tp=1 pp=1 sp=1 zero=1) on world size {world} "
            f"(dp={world} tp=1 pp=1 sp=1 zero=1): resharded; the global batch stays 8 sequences per step "
            f"(gradient accumulation 2 -> {8 // (2 * world)} micro-batch(es) per dp rank)") in said, said
    assert all("resuming step" not in r[1] for r in results[1:])  # rank 0 says it
