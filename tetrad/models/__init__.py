"""Reference decoder models (no parallelism) and Hugging Face adapters."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .args import ModelArgs, default_d_ff
from .counts import flops_per_token, num_params
from .hf import HFCausalLM, _get
from .loss import cross_entropy
from .shape import shape_of
from .transformer import MLP, Attention, Block, CoreAttention, Transformer, init_parameter


def build_model(model_cfg: Any, seed: int = 0, device: Any = None) -> nn.Module:
    """arch gpt | llama -> Transformer; arch hf -> HFCausalLM (any causal LM of transformers).

    ``device="meta"`` (tetrad models) builds shapes only: nothing is allocated or initialised
    until ``model.materialize(device)``, typically after a pipeline stage pruned the layers it
    does not own. A Hugging Face model from ``hf_path`` is always built on the meta device (the
    engine streams this rank's weights into it); one from ``hf_model_type`` is built whole.
    """
    if _get(model_cfg, "arch") == "hf":
        from .hf import build_hf
        return build_hf(model_cfg, seed)
    args = ModelArgs.from_config(model_cfg)
    if device is None:
        return Transformer(args, seed=seed)
    with torch.device(device):
        return Transformer(args, seed=seed)


__all__ = [
    "Attention", "Block", "CoreAttention", "HFCausalLM", "MLP", "ModelArgs", "Transformer",
    "build_model", "cross_entropy", "default_d_ff", "flops_per_token", "init_parameter", "num_params",
    "shape_of",
]
