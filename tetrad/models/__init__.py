"""Reference decoder models (no parallelism) and Hugging Face adapters."""

from __future__ import annotations

from typing import Any

from torch import nn

from .args import ModelArgs, default_d_ff
from .counts import flops_per_token, num_params
from .hf import HFCausalLM, _get
from .loss import cross_entropy
from .transformer import MLP, Attention, Block, CoreAttention, Transformer


def build_model(model_cfg: Any, seed: int = 0) -> nn.Module:
    """arch gpt | llama -> Transformer; arch hf -> HFCausalLM (hf_model_type llama | gpt2)."""
    if _get(model_cfg, "arch") == "hf":
        from .hf import build_hf
        return build_hf(model_cfg, seed)
    return Transformer(ModelArgs.from_config(model_cfg), seed=seed)


__all__ = [
    "Attention", "Block", "CoreAttention", "HFCausalLM", "MLP", "ModelArgs", "Transformer",
    "build_model", "cross_entropy", "default_d_ff", "flops_per_token", "num_params",
]
