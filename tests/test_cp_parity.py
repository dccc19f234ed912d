"""Context parallelism (ring attention) reproduces one process's loss curve.

fp32, relative 1e-5 per step over 10 steps, through ``Trainer`` on the tensor-parallel parity
configs (Llama with GQA 8/4 heads, GPT with learned positions and tied embeddings, Hugging
Face Llama and GPT-2): cp alone with and without the zigzag load balance and with
recomputation (full recompute re-runs the ring inside backward), and cp composed with
Megatron-SP tp, Ulysses sp (USP), ZeRO-3 over dp and pipeline stages. One spawned world per
size runs all of its layouts in turn.
"""

from __future__ import annotations

import pytest

from test_tp_parity import _check, reference  # noqa: F401  (the module-scoped fixture; _check asserts every rank's losses against one process at rtol 1e-5)

pytest.importorskip("transformers")


@pytest.mark.slow
def test_world2_cp_tetrad_and_hf(reference, tmp_path):  # noqa: F811
    _check(reference, tmp_path, 2, [
        ("llama", {"cp": 2}), ("llama", {"cp": 2, "cp_load_balance": False}), ("gpt", {"cp": 2}),
        ("hf_llama", {"cp": 2}), ("hf_gpt2", {"cp": 2}),
        ("llama", {"cp": 2, "recompute": "full"}), ("llama", {"cp": 2, "recompute": "selective"}),
    ])


@pytest.mark.slow
def test_world4_cp_composed(reference, tmp_path):  # noqa: F811
    _check(reference, tmp_path, 4, [
        ("llama", {"cp": 4}),
        ("llama", {"cp": 2, "tp": 2, "megatron_sp": True}),
        ("llama", {"cp": 2, "sp": 2}),                                   # USP
        ("llama", {"cp": 2, "zero": 3, "micro_batch_size": 2}),          # dp = 2
        ("llama", {"cp": 2, "pp": 2, "micro_batch_size": 2}),
        ("gpt", {"cp": 2, "tp": 2, "megatron_sp": True}),
        ("hf_llama", {"cp": 2, "tp": 2}),
        ("hf_llama", {"cp": 2, "sp": 2}),                                # USP through HF attention
    ])
