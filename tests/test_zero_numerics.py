"""fp16 dynamic loss scaling skips an overflowing step; the global norm sums the right groups."""

from __future__ import annotations

import math

import pytest

from harness import run_distributed

MODEL = {"arch": "gpt", "vocab_size": 128, "d_model": 32, "n_layers": 2, "n_heads": 4, "seq_len": 16}


def _fp16_overflow(rank: int, world: int, stage: int) -> dict:
    import torch

    from tetrad.config.schema import OptimizerConfig
    from tetrad.models import build_model
    from tetrad.engine import Engine

    engine = Engine(build_model(MODEL, seed=0), strategy={"zero": stage, "micro_batch_size": 2},
                    precision="fp16", global_batch_size=2 * world,
                    optim_cfg=OptimizerConfig(lr=1e-3, warmup_steps=0), total_steps=10)
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(rank))
    x, y = tokens[:, :-1], tokens[:, 1:]
    engine.train_step((x, y))
    masters = [g.master.clone() for g in engine.data_parallel.groups]
    scale = engine.scaler.get_scale()
    # Inject an overflow on one rank only: every rank must still agree to skip.
    loss = engine.loss(engine(x), y) * (1e6 if rank == 0 else 1.0)
    engine.backward(loss * 1e4)
    engine.step()
    skipped = engine.last["skipped"]
    unchanged = all(torch.equal(m, g.master) for m, g in zip(masters, engine.data_parallel.groups))
    new_scale = engine.scaler.get_scale()
    loss_after = engine.train_step((x, y))
    return {"skipped": skipped, "unchanged": unchanged, "scale": (scale, new_scale),
            "then_skipped": engine.last["skipped"], "loss": loss_after,
            "dtype": str(next(engine.model.parameters()).dtype)}


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_fp16_overflow_is_skipped(stage):
    for got in run_distributed(_fp16_overflow, 2, stage):
        assert got["dtype"] == "torch.float16"
        assert got["skipped"] and got["unchanged"]
        assert got["scale"][1] == got["scale"][0] / 2
        assert not got["then_skipped"] and math.isfinite(got["loss"])


def _norms(rank: int, world: int) -> float:
    import torch
    import torch.distributed as dist

    from tetrad.zero.flat import FlatGroup
    from tetrad.zero.norm import global_grad_norm

    def group(tp: bool) -> FlatGroup:
        return FlatGroup([], [], [], 2, rank, world, 0, tp)

    # Ranks hold disjoint dp shards; tensor-parallel grads differ across "tp" (here the same
    # two ranks), replicated ones are counted once.
    tp_grad = torch.tensor([3.0 * (rank + 1)])       # squares 9, 36 summed over tp
    rep_grad = torch.tensor([4.0])                    # identical on both tp ranks: 16 once
    norm = global_grad_norm([group(True), group(False)], [tp_grad, rep_grad], sharded=False,
                            dp_group=None, norm_groups={"tp": dist.group.WORLD}, device=torch.device("cpu"))
    return float(norm)


def test_global_norm_counts_tensor_parallel_once_per_shard():
    for got in run_distributed(_norms, 2):
        assert got == pytest.approx(math.sqrt(9 + 36 + 16))
