"""Recomputation changes memory, never numerics: losses and gradients match `none` bitwise."""

from __future__ import annotations

import copy

import pytest
import torch

from tetrad.config import ConfigError
from tetrad.models.args import ModelArgs
from tetrad.models.transformer import Transformer
from tetrad.recompute import apply_recompute, recompute_plan

ARCHS = {
    "gpt": ModelArgs(arch="gpt", d_model=32, n_layers=3, n_heads=4, seq_len=32, dropout=0.1),
    "llama": ModelArgs(arch="llama", d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, seq_len=32,
                       dropout=0.1),
}


def _loss_and_grads(model, ids, seed=11):
    torch.manual_seed(seed)  # the same dropout stream for both models
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    assert torch.equal(la, lb), (la.item(), lb.item())
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-6, atol=0, msg=name)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("policy", ["selective", "full"])
def test_policy_matches_none(arch, policy):
    """Dropout is on (0.1): the recomputed pass must replay the same masks (RNG restored)."""
    ref = Transformer(ARCHS[arch], seed=3)
    model = apply_recompute(copy.deepcopy(ref), policy)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    _assert_same(_loss_and_grads(model, ids), _loss_and_grads(ref, ids))
    assert recompute_plan(model) == [policy] * 3


def test_dropout_is_really_on():
    """Guards the test above: with dropout 0.1 two seeds give different losses."""
    model = apply_recompute(Transformer(ARCHS["gpt"], seed=3), "full")
    ids = torch.randint(0, 256, (2, 32))
    assert not torch.equal(_loss_and_grads(model, ids, 1)[0], _loss_and_grads(model, ids, 2)[0])


@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_parameter_names_and_state_dict_unchanged(policy):
    ref = Transformer(ARCHS["llama"], seed=3)
    model = apply_recompute(copy.deepcopy(ref), policy)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert model.state_dict().keys() == ref.state_dict().keys()
    ref.load_state_dict(model.state_dict())  # strict, both ways
    model.load_state_dict(ref.state_dict())


def test_reapply_switches_policy_and_eval_runs_plainly():
    model = Transformer(ARCHS["gpt"], seed=3)
    apply_recompute(model, "full")
    apply_recompute(model, "selective")
    assert recompute_plan(model) == ["selective"] * 3
    apply_recompute(model, "none")
    assert recompute_plan(model) == ["none"] * 3
    apply_recompute(model, "full").eval()
    with torch.no_grad():  # no checkpoint (and no warning) where nothing is saved
        assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 256)


def test_errors_name_key_and_value():
    model = Transformer(ARCHS["gpt"], seed=3)
    with pytest.raises(ValueError, match=r"strategy.recompute='some'"):
        apply_recompute(model, "some")
    with pytest.raises(TypeError, match=r"BLOCK_PATHS in tetrad/recompute/finder.py"):
        apply_recompute(torch.nn.Linear(2, 2), "full")
    assert isinstance(apply_recompute(torch.nn.Linear(2, 2), "none"), torch.nn.Linear)
    with pytest.raises(ValueError, match=r"recompute_budget_mb=None"):
        apply_recompute(model, "budget")


# ------------------------------------------------------------------ budget
def _fixed(none=100, selective=40, full=10):
    return lambda block: {"none": none, "selective": selective, "full": full}


@pytest.mark.parametrize("budget,expected", [
    (10_000, ["none"] * 3),
    (240, ["selective", "none", "none"]),              # 40 + 100 + 100
    (180, ["selective", "selective", "none"]),
    (120, ["selective"] * 3),
    (90, ["full", "selective", "selective"]),           # cheaper than two full layers
    (30, ["full"] * 3),
])
def test_budget_picks_cheapest_fitting_mix(budget, expected):
    model = Transformer(ARCHS["gpt"], seed=3)
    apply_recompute(model, "budget", budget, _fixed(), costs={"none": 0, "selective": 0.2, "full": 1})
    assert recompute_plan(model) == expected


def test_budget_prefers_full_when_selective_saves_little():
    """Selective that saves almost nothing (flash attention) loses to one full layer."""
    model = Transformer(ARCHS["gpt"], seed=3)
    apply_recompute(model, "budget", 210, _fixed(selective=99), costs={"none": 0, "selective": 0.2,
                                                                      "full": 1})
    assert recompute_plan(model) == ["full", "none", "none"]


def test_budget_too_small_fails_clearly():
    model = Transformer(ARCHS["gpt"], seed=3)
    with pytest.raises(ConfigError, match=r"strategy.recompute_budget_mb=.*even full recomputation"):
        apply_recompute(model, "budget", 29, _fixed())


def test_budget_with_measured_memory_is_monotonic():
    """Default layer_memory measures the real block: more budget never recomputes more."""
    model = Transformer(ARCHS["gpt"], seed=3)
    ranks = {"none": 0, "selective": 1, "full": 2}
    plans = []
    for mb in (0.3, 0.6, 1.0, 2.0, 64.0):
        apply_recompute(model, "budget", int(mb * 2**20), batch_size=8)
        plans.append([ranks[p] for p in recompute_plan(model)])
    assert plans[-1] == [0, 0, 0] and plans[0] != [0, 0, 0]
    assert all(sum(a) >= sum(b) for a, b in zip(plans, plans[1:])), plans
