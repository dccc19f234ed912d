"""Pipeline pieces that need no processes: schedules on a cost model, stage split, and the
backward split of zero-bubble schedules."""

from __future__ import annotations

import pytest
import torch

from tetrad.parallel.pipeline import (balanced_partition, build_schedule, bubble, even_partition,
                                      simulate, split_model, theoretical_bubble)
from tetrad.parallel.pipeline.zero_bubble import WeightGradStore

LAYOUTS = [(2, 2), (2, 4), (4, 4), (4, 8), (4, 12), (3, 6)]


@pytest.mark.parametrize("p,m", LAYOUTS)
@pytest.mark.parametrize("name,v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 3),
                                    ("zero_bubble", 1)])
def test_schedule_is_complete_and_deadlock_free(name, v, p, m):
    if name == "interleaved" and m % p:
        pytest.skip("interleaved needs m % p == 0 (rejection tested below)")
    sched = build_schedule(name, p, m, v)
    for r, acts in enumerate(sched):
        kinds = ("F", "B", "W") if name == "zero_bubble" else ("F", "B")
        assert sorted(acts) == sorted((k, j, c) for k in kinds for j in range(m) for c in range(v))
    timeline = simulate(sched, (1.0, 1.0, 1.0))  # raises on deadlock
    measured = sum(bubble(timeline)) / p
    theory = theoretical_bubble(name, p, m, v, (1.0, 1.0, 1.0))
    if name != "zero_bubble" or m >= 2 * p:  # ZB-H1's formula assumes a long enough steady state
        assert measured == pytest.approx(theory, abs=1e-9)


def test_bubble_ordering_on_cost_model():
    costs = (1.0, 1.0, 1.0)
    b = {n: sum(bubble(simulate(build_schedule(n, 4, 8, v), costs))) / 4
         for n, v in [("1f1b", 1), ("interleaved", 2), ("zero_bubble", 1)]}
    assert b["interleaved"] < b["1f1b"] and b["zero_bubble"] < b["1f1b"]


def test_one_f_one_b_in_flight_at_most_p():
    for p, m in LAYOUTS:
        for r, acts in enumerate(build_schedule("1f1b", p, m)):
            live = peak = 0
            for a in acts:
                live += 1 if a.kind == "F" else -1
                peak = max(peak, live)
            assert peak <= p - r


def test_bad_micro_batch_counts_and_names_are_rejected():
    with pytest.raises(ValueError, match="multiple of strategy.pp=4"):
        build_schedule("interleaved", 4, 6, 2)
    with pytest.raises(ValueError, match="pipeline_schedule"):
        build_schedule("zb-v", 4, 8)
    with pytest.raises(ValueError, match="virtual_stages=2"):
        build_schedule("1f1b", 4, 8, 2)
    with pytest.raises(ValueError, match="at least one layer"):
        even_partition(3, 4)


def test_partitions():
    assert [len(r) for r in even_partition(10, 4)] == [3, 3, 2, 2]
    # a heavy head pushes layers away from the last chunk; a heavy embedding from the first
    assert [len(r) for r in balanced_partition([1.0] * 8, 4, head_cost=2.0)] in ([3, 2, 2, 1], [2, 3, 2, 1], [2, 2, 3, 1])
    assert [len(r) for r in balanced_partition([1.0] * 8, 4, embed_cost=2.0)][0] == 1
    assert [len(r) for r in balanced_partition([1.0, 1.0, 4.0, 1.0, 1.0, 1.0], 3)] == [2, 1, 3]


def _tiny(n_layers: int = 4):
    from tetrad.models import ModelArgs, Transformer

    return Transformer(ModelArgs(arch="gpt", vocab_size=32, d_model=16, n_layers=n_layers,
                                 n_heads=2, seq_len=8), seed=1)


def test_split_keeps_plain_names_and_only_owned_layers():
    model = _tiny(8)
    names = {n for n, _ in model.named_parameters()}
    chunks = split_model(model, rank=1, p=2, v=2)  # global chunks 1 and 3 of 4: layers 2-3, 6-7
    held = {n for n, _ in model.named_parameters()}
    assert held <= names
    assert {n.split(".")[1] for n in held if n.startswith("layers.")} == {"2", "3", "6", "7"}
    assert any(n.startswith("lm_head") for n in held) and not any(n.startswith("tok_emb") for n in held)
    assert [c.index for c in chunks] == [1, 3] and chunks[1].is_last and not chunks[0].is_first


def test_weight_gradients_are_deferred_to_w_and_exact():
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = _tiny()
    ref(ids).square().mean().backward()
    model, store = _tiny(), WeightGradStore()
    with store.capture():
        out = model(ids).square().mean()
    with store.backward_of("mb0"):
        out.backward()
    assert model.layers[0].attn.q_proj.weight.grad is None  # W not run yet
    assert model.layers[0].attn_norm.weight.grad is not None  # non-Linear weights: in B
    store.run("mb0")
    assert not store.pending()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("policy,deferred", [("full", 1), ("selective", 4 * 6 + 1), ("none", 4 * 6 + 1)])
def test_weight_split_composes_with_recompute(policy, deferred):
    """Recomputed blocks keep plain Linears (autograd drops function modes in backward), the rest
    are split; gradients stay exact either way."""
    from tetrad.recompute import apply_recompute
    from tetrad.parallel.pipeline.zero_bubble import exclude_recomputed

    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = _tiny()
    ref(ids).square().mean().backward()
    model, store = apply_recompute(_tiny(), policy), WeightGradStore()
    exclude_recomputed(store, model.layers)
    for _ in range(2):  # twice: an early-stopped recompute must not leave splitting paused
        model.zero_grad(set_to_none=True)
        with store.capture():
            out = model(ids).square().mean()
        with store.backward_of("mb0"):
            torch.autograd.backward(out)
        assert len(store.work["mb0"]) == deferred
        store.run("mb0")
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)
