"""On one CUDA GPU, through the real engine: bf16 training, ZeRO 0-3 with and without CPU/NVMe
offload in every step mode, recompute, compile, checkpoints (bitwise resume, lazy snapshot =
synchronous save), peak device memory against memory_report(), and ZeRO-3 + offload keeping
far less than the model on the device (B8).

fp32 comparisons run with TF32 off (``tf32=False``): TF32 rounds matmul inputs to 10 bits, so
layouts would differ by far more than the parity tolerance for reasons unrelated to them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

MODEL = {"arch": "llama", "d_model": 256, "n_heads": 8, "n_kv_heads": 4, "n_layers": 4,
         "seq_len": 128, "vocab_size": 512, "dropout": 0.0}
STEPS, BATCH = 6, 4


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("TETRAD_DEVICE", raising=False)


def _batches():
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, MODEL["vocab_size"], (2, BATCH, MODEL["seq_len"] + 1), generator=g)
    return [(t[i % 2, :, :-1], t[i % 2, :, 1:]) for i in range(STEPS)]


def _engine(strategy: dict, precision: str = "fp32", model=None, **kw):
    from tetrad.config.schema import OptimizerConfig
    from tetrad.engine import Engine
    from tetrad.models import build_model

    return Engine(model or build_model(MODEL, seed=0), strategy={"micro_batch_size": 2, **strategy},
                  optim_cfg=OptimizerConfig(lr=3e-3, warmup_steps=0, grad_clip=kw.pop("clip", 0.0)),
                  precision=precision, global_batch_size=BATCH, total_steps=STEPS, tf32=False, **kw)


def _losses(engine) -> list[float]:
    out = [engine.train_step(b) for b in _batches()]
    engine.close()
    return out


def test_the_engine_runs_on_the_gpu():
    engine = _engine({})
    assert engine.device.type == "cuda" and next(engine.model.parameters()).is_cuda


def test_bf16_trains_through_the_trainer(tmp_path):
    from tetrad.trainer.trainer import Trainer

    cfg = {"run": {"output_dir": str(tmp_path), "steps": 20, "global_batch_size": 8, "precision": "bf16"},
           "model": MODEL, "optimizer": {"lr": 3e-3, "warmup_steps": 2},
           "logging": {"tensorboard": False, "progress": False}}
    history = Trainer(cfg).fit()
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    assert history[-1]["peak_device_mb"] > 0


OFFLOADS = [({"zero": z}, None) for z in (1, 2, 3)] + [
    ({"zero": 2, "offload": {"optimizer": "cpu"}}, None),
    ({"zero": 3, "offload": {"optimizer": "cpu", "params": "cpu"}}, None),
    ({"zero": 2, "offload": {"optimizer": "nvme"}}, "nvme"),
    ({"zero": 3, "offload": {"optimizer": "nvme", "params": "nvme"}}, "nvme"),
    ({"zero": 2, "offload": {"optimizer": "cpu", "step": "overlap"}}, None),
    ({"zero": 3, "offload": {"optimizer": "nvme", "step": "overlap"}}, "nvme"),
]


@pytest.mark.parametrize("strategy,disk", OFFLOADS, ids=[str(s) for s, _ in OFFLOADS])
def test_zero_and_offload_reproduce_plain_data_parallel(strategy, disk, tmp_path):
    ref = _losses(_engine({"zero": 0}))
    if disk:
        strategy = {**strategy, "offload": {**strategy["offload"], "nvme_dir": str(tmp_path)}}
    np.testing.assert_allclose(_losses(_engine(strategy)), ref, rtol=1e-5)
    assert ref[-1] < ref[0]


def test_delayed_offload_step_trains_and_differs_from_prompt():
    prompt = _losses(_engine({"zero": 2, "offload": {"optimizer": "cpu"}}, clip=1.0))
    delayed = _losses(_engine({"zero": 2, "offload": {"optimizer": "cpu", "step": "delayed"}}, clip=1.0))
    assert delayed[-1] < delayed[0] and abs(delayed[-1] - prompt[-1]) > 1e-4


@pytest.mark.parametrize("policy", ["selective", "full"])
def test_recompute_matches_none(policy):
    np.testing.assert_allclose(_losses(_engine({"recompute": policy})), _losses(_engine({})), rtol=1e-5)


def test_compile_matches_eager_in_bf16():
    eager = _losses(_engine({"zero": 1}, precision="bf16"))
    compiled = _losses(_engine({"zero": 1}, precision="bf16", compile=True))
    np.testing.assert_allclose(compiled, eager, rtol=2e-2)  # bf16: fused kernels round differently


def test_checkpoint_resume_is_bitwise_and_lazy_snapshot_equals_sync(tmp_path):
    from tetrad.trainer.trainer import Trainer

    def cfg(out, steps, every, lazy):
        return {"run": {"output_dir": str(out), "steps": steps, "global_batch_size": 4, "precision": "bf16"},
                "model": MODEL, "optimizer": {"lr": 3e-3, "warmup_steps": 0},
                "strategy": {"zero": 2, "micro_batch_size": 2},
                "checkpoint": {"every": every, "async": lazy, "keep": 5},
                "logging": {"tensorboard": False, "progress": False}}
    full = Trainer(cfg(tmp_path / "full", 8, 4, True)).fit()
    half = Trainer(cfg(tmp_path / "half", 4, 4, False)).fit()
    resumed = Trainer(cfg(tmp_path / "half", 8, 4, False)).fit()
    assert [r["loss"] for r in full] == [r["loss"] for r in half + resumed]
    lazy = tmp_path / "full" / "checkpoints" / "step_00000004"
    sync = tmp_path / "half" / "checkpoints" / "step_00000004"
    for f in sorted(p.name for p in lazy.glob("*.safetensors")):
        assert (lazy / f).read_bytes() == (sync / f).read_bytes(), f


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_peak_device_memory_against_memory_report(zero):
    torch.cuda.reset_peak_memory_stats()
    engine = _engine({"zero": zero}, precision="bf16")
    for b in _batches()[:2]:
        engine.train_step(b)
    state = engine.memory_report()["total"]
    peak = torch.cuda.max_memory_allocated()
    engine.close()
    assert state <= peak < state * 1.5 + 512 * 2**20, (state, peak)  # + activations and buffers


def test_zero3_offload_keeps_far_less_than_the_model_on_the_device(tmp_path):
    """B8: the model is never placed on the GPU whole; one unit is gathered at a time."""
    from tetrad.models import build_model

    big = {**MODEL, "d_model": 1024, "n_layers": 16, "n_heads": 16, "n_kv_heads": 8, "vocab_size": 4096}
    model = build_model(big, seed=0)
    fp32_bytes = sum(p.numel() for p in model.parameters()) * 4
    torch.cuda.reset_peak_memory_stats()
    engine = _engine({"zero": 3, "offload": {"optimizer": "cpu", "params": "cpu"}}, precision="bf16",
                     model=model)
    for b in _batches()[:2]:
        engine.train_step((b[0] % big["vocab_size"], b[1] % big["vocab_size"]))
    peak = torch.cuda.max_memory_allocated()
    engine.close()
    assert peak < fp32_bytes / 4, (peak, fp32_bytes)
