"""The Engine inside a hand-written loop: the micro-batch API, a user's optimizer, precisions."""

import numpy as np
import pytest
import torch

from harness import run_distributed
from test_dp_parity import tiny_config

STEPS = 6


def _batches(seed: int = 0):
    from tetrad.data import GlobalBatchSampler, TokenDataset, builtin_tokens

    dataset = TokenDataset(builtin_tokens(20_000, seed=seed), seq_len=32)
    sampler = GlobalBatchSampler(len(dataset), 8, seed=seed)
    return [dataset.get_batch(sampler.next_indices()) for _ in range(STEPS)]


def _model():
    from tetrad.models import Transformer
    from tetrad.models.args import ModelArgs

    return Transformer(ModelArgs(arch="gpt", vocab_size=256, d_model=32, n_layers=2, n_heads=4,
                                 seq_len=32), seed=3)


def _loop(rank, world, api: str):
    """Train with a user-built AdamW; return the global-batch losses."""
    import tetrad
    from tetrad.data import shard_indices

    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    engine = tetrad.parallelize(model, optimizer=opt, strategy={"micro_batch_size": 2},
                                global_batch_size=8)
    losses = []
    for inputs, labels in _batches():
        local = shard_indices(np.arange(8), engine.dp_rank, engine.layout.dp)
        x, y = inputs[local], labels[local]
        if api == "train_step":
            losses.append(engine.train_step((x, y)))
            continue
        total = 0.0
        for xm, ym in zip(x.split(2), y.split(2)):
            loss = engine.loss(engine(xm), ym)
            engine.backward(loss)
            engine.step()
            total += loss.item()
        t = torch.tensor([total / len(x.split(2))])
        torch.distributed.all_reduce(t)
        losses.append(t.item() / world)
    assert engine.step_count == STEPS
    return losses


def test_micro_batch_api_matches_train_step():
    ref = run_distributed(_loop, 1, "train_step")[0]
    by_hand = run_distributed(_loop, 2, "micro")
    stepped = run_distributed(_loop, 2, "train_step")
    np.testing.assert_allclose(by_hand[0], ref, rtol=1e-5)
    np.testing.assert_allclose(stepped[1], ref, rtol=1e-5)
    assert ref[-1] < ref[0]


def _fit(rank, world, config):
    from tetrad.trainer.trainer import Trainer

    return [(r["loss"], r["skipped"]) for r in Trainer(config).fit()]


@pytest.mark.parametrize("precision,rtol", [("bf16", 0.03), ("fp16", 0.03)])
def test_low_precision_tracks_fp32(tmp_path, precision, rtol):
    """bf16/fp16 compute follow the fp32 curve to within a few percent over 10 steps."""
    fp32 = run_distributed(_fit, 2, tiny_config(str(tmp_path / "a"), micro_batch_size=2))[0]
    cfg = tiny_config(str(tmp_path / "b"), micro_batch_size=2)
    cfg["run"]["precision"] = precision
    low = run_distributed(_fit, 2, cfg)[0]
    kept = [(a[0], b[0]) for a, b in zip(fp32, low) if not b[1]]
    assert len(kept) >= len(fp32) - 2  # fp16 may skip an early overflowing step
    np.testing.assert_allclose([b for _, b in kept], [a for a, _ in kept], rtol=rtol)
    assert kept[-1][1] < kept[0][1]
