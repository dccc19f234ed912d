"""Measured activation bytes per block: none > selective > full, and full keeps only the input."""

from __future__ import annotations

import pytest
import torch

from tetrad.models.args import ModelArgs
from tetrad.models.transformer import Block
from tetrad.models.counts import activation_bytes
from tetrad.recompute import measure_layer_activation_bytes


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("s,b,h,a", [(64, 2, 32, 4), (128, 1, 64, 8)])
def test_ordering_and_full_is_the_input(arch, s, b, h, a):
    torch.manual_seed(0)
    block = Block(ModelArgs(arch=arch, d_model=h, n_heads=a, seq_len=s, dropout=0.1))
    mem = measure_layer_activation_bytes(block, torch.randn(b, s, h))
    assert mem["none"] > mem["selective"] > mem["full"], mem
    layer_input = s * b * h * 4
    assert layer_input <= mem["full"] <= 1.05 * layer_input, mem
    # What selective removes grows with s^2: at least the softmax output and the dropped-out
    # probabilities (CPU SDPA with dropout keeps a float mask as well), fp32.
    assert mem["none"] - mem["selective"] >= 2 * 4 * a * s * s * b, mem
    # Same order of magnitude as the paper's fp32-scaled accounting (model details differ).
    for policy in ("none", "selective"):
        assert 0.4 < mem[policy] / activation_bytes(s, b, h, a, policy=policy, bytes_per_element=4) < 2.0, (policy, mem)


def test_measuring_restores_policy_mode_and_rng():
    block = Block(ModelArgs(arch="gpt", d_model=32, n_heads=4, seq_len=16, dropout=0.1)).eval()
    sample = torch.randn(1, 16, 32)
    state = torch.get_rng_state()
    measure_layer_activation_bytes(block, sample)
    assert torch.equal(state, torch.get_rng_state())
    assert not block.training and type(block) is Block
