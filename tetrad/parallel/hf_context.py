"""Context parallelism inside Hugging Face models: ring attention as an attention function.

A Hugging Face attention module computes q, k, v (and applies RoPE) itself, then calls the
function ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` on [b, heads, n, d] tensors
(K/V not yet repeated for GQA). tetrad registers one more implementation, ``tetrad_ring``,
that runs the module's ``tetrad_ring`` (a ``RingAttention`` over the cp group, set here on
each attention module: no process group lives in a global) and a mask function that builds
no mask (the ring applies causality itself, across ranks). Positions follow the rank's
tokens: a pre-hook on the rotary embedding module (Llama: ``rotary_emb(x, position_ids)``)
or on the learned position table (GPT-2: ``wpe(position_ids)``) replaces the default
0..n-1 by the layout's positions, so the same hooks serve a whole model and a pipeline stage.
"""

from __future__ import annotations

from torch import nn

from tetrad.parallel.context import RingAttention

IMPLEMENTATION = "tetrad_ring"


def _ring_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    ring = getattr(module, "tetrad_ring", None)
    if ring is None:
        raise RuntimeError(f"{type(module).__name__} runs attention '{IMPLEMENTATION}' but has no "
                           f"ring attached: build the model's parallel form with tetrad.parallel.plan")
    if kwargs.get("sliding_window") or getattr(module, "sliding_window", None):
        raise RuntimeError(f"{type(module).__name__} attends within a sliding window, which tetrad's "
                           f"ring attention does not implement: use strategy.cp=1 for this model")
    return ring(query, key, value, scale=scaling).transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs):
    return None


def register() -> None:
    """Make ``tetrad_ring`` a Hugging Face attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _ring_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)


def _positions_hook(positions):
    """Pre-hook replacing a ``position_ids`` input ([1, n] or [b, n]) by the rank's positions."""

    def hook(mod, args, kwargs):
        if "position_ids" in kwargs:
            ids = kwargs["position_ids"]
            kwargs = {**kwargs, "position_ids": positions(ids.shape[-1], ids.device).expand_as(ids)}
        elif len(args) > 1:  # rotary_emb(x, position_ids)
            ids = args[1]
            args = (args[0], positions(ids.shape[-1], ids.device).expand_as(ids), *args[2:])
        else:  # wpe(position_ids)
            ids = args[0]
            args = (positions(ids.shape[-1], ids.device).expand_as(ids), *args[1:])
        return args, kwargs

    return hook


def apply_hf_context(model: nn.Module, layout) -> nn.Module:
    """Ring attention over ``layout.cp_group`` in every attention module of a Hugging Face
    causal LM (bare or inside ``HFCausalLM``), and positions that follow the rank's tokens."""
    register()
    hf = getattr(model, "hf", model)
    attention = [m for m in hf.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    if not attention:
        raise TypeError(f"strategy.cp > 1: found no attention modules in {type(hf).__name__}")
    for m in attention:
        m.tetrad_ring = RingAttention(None, layout.cp_group, balance=layout.cp_balance)
    hf.config._attn_implementation = IMPLEMENTATION
    hooked = 0
    for name, m in hf.named_modules():
        if type(m).__name__.endswith("RotaryEmbedding") or name.endswith("wpe"):
            m.register_forward_pre_hook(_positions_hook(layout.positions), with_kwargs=True)
            hooked += 1
    split = hasattr(model, "stage_replicas")  # a pipeline stage: positions may live on another one
    if not hooked and not split:
        raise TypeError(f"strategy.cp > 1: {type(hf).__name__} has no rotary embedding or position "
                        f"table ('*RotaryEmbedding', '*.wpe') whose positions tetrad can set")
    return model
