"""Hugging Face models wrapped by HFCausalLM: blocks found, names kept, gradients identical."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from tetrad.models.hf import build_hf  # noqa: E402
from tetrad.recompute import apply_recompute, recompute_plan  # noqa: E402


def _cfg(hf_type: str) -> dict:
    return {"arch": "hf", "hf_model_type": hf_type, "vocab_size": 64, "d_model": 32, "n_layers": 2,
            "n_heads": 4, "seq_len": 16, "dropout": 0.1}


def _run(model, ids):
    torch.manual_seed(5)
    loss = model(ids).float().square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("hf_type", ["llama", "gpt2"])
@pytest.mark.parametrize("policy", ["selective", "full"])
def test_hf_policy_matches_none(hf_type, policy):
    ref = build_hf(_cfg(hf_type), seed=1).train()
    model = apply_recompute(copy.deepcopy(ref), policy)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert recompute_plan(model) == [policy] * 2
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    (la, ga), (lb, gb) = _run(model, ids), _run(ref, ids)
    assert torch.equal(la, lb)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-6, atol=0, msg=name)


def test_hf_budget_needs_layer_memory():
    model = build_hf(_cfg("llama"), seed=1)
    with pytest.raises(ValueError, match="needs `layer_memory`"):
        apply_recompute(model, "budget", 1 << 20)
    apply_recompute(model, "budget", 160, lambda b: {"none": 100, "selective": 60, "full": 10})
    assert recompute_plan(model) == ["selective", "none"]
