"""The loss of a step is the mean over the unmasked tokens of the whole global batch, the same
under every layout: with SFT masks the micro-batches (and dp, sp ranks) hold unequal numbers of
label tokens, so averaging per-micro-batch means would differ from layout to layout.

A tetrad llama on SFT records (byte tokenizer, prompts of varied length masked) against the
one-process run that takes the global batch as a single micro-batch (its loss is the global
token mean by definition): accumulation, dp, ZeRO-2, pipeline (1F1B), Ulysses sp and
Megatron-SP tp reproduce it (fp32, rtol 1e-5, 10 steps).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from harness import run_distributed

pytest.importorskip("datasets")
STEPS = 10


def _records(n: int) -> list[dict]:
    rng = np.random.default_rng(1)
    words = ["cat", "dog", "bird", "fox", "king"]
    return [{"prompt": "q: " + " ".join(rng.choice(words, size=int(rng.integers(1, 9)))) + "? ",
             "completion": " ".join(rng.choice(words, size=int(rng.integers(1, 4)))) + "."} for _ in range(n)]


def config(out, source: str, **strategy) -> dict:
    return {"run": {"output_dir": str(out), "seed": 3, "steps": STEPS, "global_batch_size": 8},
            "model": {"arch": "llama", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "seq_len": 16},
            "data": {"source": source, "format": "sft"},
            "optimizer": {"lr": 1e-2, "warmup_steps": 2},
            "strategy": strategy,
            "logging": {"tensorboard": False, "progress": False}}


def _fit_all(rank: int, world: int, configs: list[dict]) -> list[list[float]]:
    from tetrad.trainer.trainer import Trainer

    return [[r["loss"] for r in Trainer(c).fit()] for c in configs]


@pytest.mark.slow
def test_every_layout_gives_the_global_token_mean(tmp_path):
    src = tmp_path / "sft.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in _records(200)))
    source = f"jsonl:{src}"
    reference = run_distributed(_fit_all, 1, [config(tmp_path / "ref", source, micro_batch_size=8),
                                              config(tmp_path / "acc", source, micro_batch_size=1)])[0]
    np.testing.assert_allclose(reference[1], reference[0], rtol=1e-5, err_msg="8 micro-batches of 1")
    layouts = [{"micro_batch_size": 1}, {"zero": 2, "micro_batch_size": 2}, {"pp": 2, "micro_batch_size": 2},
               {"sp": 2, "micro_batch_size": 4}, {"tp": 2, "megatron_sp": True, "micro_batch_size": 4}]
    results = run_distributed(_fit_all, 2, [config(tmp_path / str(i), source, **s) for i, s in enumerate(layouts)],
                              timeout=600)
    for i, strategy in enumerate(layouts):
        for rank_losses in results:
            np.testing.assert_allclose(rank_losses[i], reference[0], rtol=1e-5, err_msg=str(strategy))
    assert reference[0][-1] < reference[0][0]
