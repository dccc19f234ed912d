"""``shape_of(model)``: the facts a parallel layout depends on, read from a live model.

The rule book (``tetrad.config.validate``) checks layouts against a ``ModelShape``; for a
config it comes from the ``model`` section, for a model handed to the engine directly (a
tetrad ``Transformer``, an ``HFCausalLM`` or a bare Hugging Face model) from here.
"""

from __future__ import annotations

from torch import nn

from tetrad.config.validate import ModelShape


def _first(cfg, *names):
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return None


def shape_of(model: nn.Module) -> ModelShape | None:
    """The model's shape, or None for a model that declares none (any nn.Module trains
    data-parallel; only tensor/sequence/pipeline layouts need a shape)."""
    args = getattr(model, "args", None)
    if args is not None and type(model).__name__ == "Transformer":
        return ModelShape(args.n_heads, args.n_kv_heads, args.seq_len, args.n_layers, args.vocab_size,
                          args.d_model, args.dropout)
    cfg = getattr(getattr(model, "hf", model), "config", None)
    heads = _first(cfg, "num_attention_heads", "n_head")
    if cfg is None or heads is None:
        return None
    return ModelShape(heads, _first(cfg, "num_key_value_heads") or heads,
                      _first(cfg, "max_position_embeddings", "n_positions"),
                      _first(cfg, "num_hidden_layers", "n_layer"), cfg.vocab_size,
                      _first(cfg, "hidden_size", "n_embd"),
                      float(_first(cfg, "attention_dropout", "attn_pdrop") or 0.0), hf=True)
