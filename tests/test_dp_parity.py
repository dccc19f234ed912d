"""Data parallelism reproduces one process's loss curve on the same global batch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness import run_distributed

STEPS = 10


def tiny_config(output_dir: str, **strategy) -> dict:
    return {
        "run": {"output_dir": output_dir, "seed": 7, "steps": STEPS, "global_batch_size": 8,
                "precision": "fp32"},
        "model": {"arch": "llama", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                  "seq_len": 32, "dropout": 0.0},
        "data": {"source": "builtin", "builtin_tokens": 20000},
        "optimizer": {"lr": 1e-2, "warmup_steps": 2},
        "strategy": strategy,
        "logging": {"tensorboard": False, "progress": False},
    }


def _fit(rank: int, world: int, config: dict) -> list[float]:
    from tetrad.trainer.trainer import Trainer

    return [record["loss"] for record in Trainer(config).fit()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    """One process, the whole global batch as one micro-batch."""
    out = str(tmp_path_factory.mktemp("ref"))
    return run_distributed(_fit, 1, tiny_config(out, micro_batch_size=8))[0]


@pytest.mark.parametrize("world,mbs", [(2, 4), (2, 2), (4, 2), (4, 1)])
def test_data_parallel_matches_single_process(reference, tmp_path, world, mbs):
    losses = run_distributed(_fit, world, tiny_config(str(tmp_path), micro_batch_size=mbs))
    for rank_losses in losses:  # every rank reports the same global loss
        np.testing.assert_allclose(rank_losses, reference, rtol=1e-5)
    assert reference[-1] < reference[0]


def test_gradient_accumulation_matches_large_batch(reference, tmp_path):
    """Eight micro-batches of one sample take the same step as one batch of eight."""
    losses = run_distributed(_fit, 1, tiny_config(str(tmp_path), micro_batch_size=1))[0]
    np.testing.assert_allclose(losses, reference, rtol=1e-5)


def test_metrics_jsonl_has_every_field(tmp_path):
    run_distributed(_fit, 2, tiny_config(str(tmp_path), micro_batch_size=2))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_time_s", "peak_rss_mb"):
        assert all(isinstance(r[key], (int, float)) for r in records), key
    assert records[-1]["tokens"] == STEPS * 8 * 32
