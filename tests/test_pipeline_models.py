"""Any model under pipeline parallelism reproduces one process's loss curve (fp32, rtol 1e-5,
10 steps): tied input/output embeddings (tetrad GPT, Hugging Face GPT-2), Hugging Face Llama
(RoPE computed per stage) and GPT-2 split from their pipeline plans or module names, with
tensor parallelism and ZB-V (both tied ends on one rank) too; and the tied weight is one
tensor in the checkpoint, written once."""

from __future__ import annotations

import math

import numpy as np
import pytest

from harness import run_distributed
from test_tp_parity import HF_GPT2, HF_LLAMA, config

pytest.importorskip("transformers")

GPT_TIED = {"arch": "gpt", "d_model": 32, "n_layers": 4, "n_heads": 4, "seq_len": 32, "vocab_size": 258,
            "tie_embeddings": True}
MODELS = {"gpt_tied": GPT_TIED, "hf_llama": {**HF_LLAMA, "n_layers": 4},
          "hf_gpt2": {**HF_GPT2, "n_layers": 4}, "hf_gpt2_tied": {**HF_GPT2, "n_layers": 4, "tie_embeddings": True}}


def _config(out: str, model: str, world: int, **strategy) -> dict:
    cfg = config(out, "llama", world, **{"micro_batch_size": 2, **strategy})
    cfg["model"] = {"dropout": 0.0, **MODELS[model]}
    cfg["checkpoint"] = {"every": 10, "async": False}
    return cfg


def _fit_all(rank: int, world: int, configs: list[dict]) -> list[list[float]]:
    from tetrad.trainer.trainer import Trainer

    return [[record["loss"] for record in Trainer(c).fit()] for c in configs]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, list[float]]:
    out = tmp_path_factory.mktemp("ref")
    names = list(MODELS)
    losses = run_distributed(_fit_all, 1, [_config(str(out / n), n, 1, micro_batch_size=8) for n in names])[0]
    return dict(zip(names, losses))


def _check(reference, tmp_path, world, layouts):
    configs = [_config(str(tmp_path / str(i)), model, world, **s) for i, (model, s) in enumerate(layouts)]
    results = run_distributed(_fit_all, world, configs, timeout=600)
    for i, (model, strategy) in enumerate(layouts):
        for rank_losses in results:
            np.testing.assert_allclose(rank_losses[i], reference[model], rtol=1e-5, err_msg=f"{model} {strategy}")
    assert all(reference[m][-1] < reference[m][0] for m in reference)
    return configs


@pytest.mark.slow
def test_world2_tied_and_hugging_face_under_pp2(reference, tmp_path):
    from tetrad.checkpoint.reader import CheckpointReader

    layouts = [("gpt_tied", {"pp": 2}), ("hf_llama", {"pp": 2}), ("hf_gpt2", {"pp": 2}),
               ("hf_gpt2_tied", {"pp": 2}), ("gpt_tied", {"pp": 2, "pipeline_schedule": "zero_bubble_v"}),
               ("hf_llama", {"pp": 2, "pipeline_schedule": "breadth_first", "virtual_stages": 2})]
    configs = _check(reference, tmp_path, 2, layouts)
    # The tied weight is one tensor, written once (by the first stage), and no lm_head.weight.
    reader = CheckpointReader(f"{configs[0]['run']['output_dir']}/checkpoints/step_00000010")
    names = set(reader.tensors)
    assert "model/tok_emb.weight" in names and "model/lm_head.weight" not in names
    for name, entry in reader.tensors.items():
        assert sum(p["numel"] for p in entry["pieces"]) == max(1, math.prod(entry["shape"])), name


@pytest.mark.slow
def test_world4_tied_and_hf_with_tp_and_dp(reference, tmp_path):
    _check(reference, tmp_path, 4, [
        ("gpt_tied", {"pp": 2, "tp": 2}), ("gpt_tied", {"pp": 2, "zero": 1, "micro_batch_size": 1}),
        ("hf_llama", {"pp": 2, "tp": 2}), ("hf_gpt2_tied", {"pp": 2, "cp": 2}),
        # ZeRO-3 under breadth-first reduces a chunk's gradients after its last backward, but
        # the tied weight's only after the two stages have summed it
        ("gpt_tied", {"pp": 2, "zero": 3, "micro_batch_size": 1, "pipeline_schedule": "breadth_first",
                      "virtual_stages": 2}),
    ])
