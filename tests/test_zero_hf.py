"""A Hugging Face LlamaForCausalLM trains under ZeRO-3 through the Engine in a plain loop.

Nothing in tetrad knows the HF classes: stage 3 finds its units (decoder layers, embedding,
final norm, head) by the generic rule in tetrad.zero.units.
"""

from __future__ import annotations

import numpy as np
import pytest

from harness import run_distributed

pytest.importorskip("transformers")

MODEL = {"arch": "hf", "hf_model_type": "llama", "vocab_size": 128, "d_model": 32,
         "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "seq_len": 16}
GLOBAL, STEPS = 8, 10


def _loop(rank: int, world: int, stage: int) -> dict:
    import torch
    import torch.distributed as dist

    from tetrad.config.schema import OptimizerConfig
    from tetrad.models.hf import build_hf
    from tetrad.engine import Engine

    model = build_hf(MODEL, seed=0)
    engine = Engine(model, strategy={"zero": stage, "micro_batch_size": GLOBAL // world},
                    optim_cfg=OptimizerConfig(lr=1e-2, warmup_steps=2), global_batch_size=GLOBAL,
                    total_steps=STEPS)
    losses = []
    for step in range(STEPS):
        tokens = torch.randint(0, 128, (GLOBAL, 17), generator=torch.Generator().manual_seed(step % 2))  # two batches, learnable
        local = tokens.chunk(world)[rank]
        logits = engine(local[:, :-1])
        loss = engine.loss(logits, local[:, 1:])
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(float(total) / world)
    units = [u.name for u in engine.data_parallel.params.units] if stage == 3 else []
    return {"losses": losses, "units": units}


def test_hf_llama_zero3_matches_single_process():
    reference = run_distributed(_loop, 1, 0)[0]["losses"]
    results = run_distributed(_loop, 2, 3)
    for got in results:
        np.testing.assert_allclose(got["losses"], reference, rtol=1e-5)
    assert reference[-1] < reference[0]
    units = results[0]["units"]
    assert units == ["hf.model.embed_tokens", "hf.model.layers.0", "hf.model.layers.1",
                     "hf.model.norm", "hf.lm_head"], units
