"""Activation memory per rank under context parallelism falls as 1/cp, against the formula.

The bytes one Llama block's autograd graph keeps alive on a rank (graph_bytes), for the rank's
own tokens, beside Korthikanti et al.'s sbh(10 + 24/t) (34sbh/t with Megatron-SP) at fp32 with
s = seq_len / (cp * sp): every cp layout sits at one measured/formula constant, so memory
scales exactly as the formula says (bench/context.py prints the table in docs/benchmarks.md).
"""

from __future__ import annotations

import pytest

from harness import run_distributed

SEQ, D = 256, 64
LAYOUTS = [{}, {"cp": 2}, {"cp": 4}, {"cp": 2, "sp": 2}, {"cp": 2, "tp": 2, "megatron_sp": True}]


def _measure(rank: int, world: int) -> list[tuple[float, float]]:
    import torch

    from tetrad.config import load_strategy
    from tetrad.engine import Engine
    from tetrad.models import ModelArgs, Transformer
    from tetrad.models.counts import activation_bytes
    from tetrad.recompute.measure import graph_bytes

    out = []
    for strategy in LAYOUTS:
        model = Transformer(ModelArgs(arch="llama", d_model=D, n_heads=4, n_layers=1, seq_len=SEQ), seed=0)
        e = Engine(model, strategy=load_strategy({**strategy, "micro_batch_size": 1}),
                   global_batch_size=e_dp(strategy, world))
        L = e.layout
        s = SEQ // (L.cp * L.sp)
        x = torch.randn(1, s // (L.tp if L.megatron_sp_active else 1), D, requires_grad=True)
        measured = graph_bytes(e.model.layers[0], x)
        formula = 2 * activation_bytes(s, 1, D, 4, t=L.tp, policy="selective", megatron_sp=L.megatron_sp_active)
        out.append((measured, formula))
    return out


def e_dp(strategy: dict, world: int) -> int:
    return world // (strategy.get("cp", 1) * strategy.get("sp", 1) * strategy.get("tp", 1))


@pytest.mark.slow
def test_activation_memory_falls_as_one_over_cp():
    results = run_distributed(_measure, 4)
    for rank_results in results[1:]:
        assert rank_results == results[0]  # every rank of these layouts keeps the same bytes
    (b1, f1), (b2, f2), (b4, f4), (usp, fusp), (msp, fmsp) = results[0]
    assert b4 == pytest.approx(b2 / 2, rel=0.02) and f4 == pytest.approx(f2 / 2)
    assert b2 < 0.56 * b1  # 1/cp, plus the ring's own saved log-sum-exp over cp=1's SDPA
    ring = [b2 / f2, b4 / f4, usp / fusp, msp / fmsp]
    assert max(ring) / min(ring) < 1.05, ring  # one constant: the formula's scaling
    assert 1.0 < min(ring) and max(ring) < 1.5
