"""Hugging Face causal LMs behind the same forward(input_ids) -> logits interface."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .args import ModelArgs


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("model.arch=hf needs Hugging Face transformers: "
                          "pip install transformers") from e
    return transformers


class HFCausalLM(nn.Module):
    """Adapter so the trainer treats HF models like native ones; the HF model is `self.hf`."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        self.hf = hf_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits


def _get(cfg: Any, key: str) -> Any:
    return cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)


def hf_config(model_cfg: Any):
    """Build a transformers config (never downloads) from a model config section."""
    tf = _transformers()
    hf_type = _get(model_cfg, "hf_model_type") or "llama"
    args = ModelArgs.from_config(model_cfg)  # validates and fills n_kv_heads / d_ff defaults
    if hf_type == "llama":
        return tf.LlamaConfig(
            vocab_size=args.vocab_size, hidden_size=args.d_model,
            intermediate_size=args.d_ff,
            num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
            num_key_value_heads=args.n_kv_heads, max_position_embeddings=args.seq_len,
            rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
            attention_dropout=args.dropout, tie_word_embeddings=args.tie_embeddings)
    if hf_type == "gpt2":
        if args.n_kv_heads != args.n_heads:
            raise ValueError(f"model.n_kv_heads={args.n_kv_heads}: gpt2 has no grouped-query "
                             f"attention; use n_kv_heads=null or {args.n_heads}")
        return tf.GPT2Config(
            vocab_size=args.vocab_size, n_embd=args.d_model, n_layer=args.n_layers,
            n_head=args.n_heads, n_inner=args.d_ff,
            n_positions=args.seq_len, layer_norm_epsilon=args.norm_eps,
            resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
            tie_word_embeddings=args.tie_embeddings)
    raise ValueError(f"model.hf_model_type={hf_type!r} is not valid; expected 'llama' or 'gpt2'")


def build_hf(model_cfg: Any, seed: int = 0) -> HFCausalLM:
    """Randomly initialised HF model, the same for a given seed whatever the global RNG."""
    tf = _transformers()
    config = hf_config(model_cfg)
    cls = tf.LlamaForCausalLM if isinstance(config, tf.LlamaConfig) else tf.GPT2LMHeadModel
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(config)
    return HFCausalLM(model)
