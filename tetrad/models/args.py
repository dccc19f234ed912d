"""Model hyperparameters: the one small dataclass every reference model is built from."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

ARCHS = ("gpt", "llama")

# Hugging Face model types and the native family whose shapes they share, so that cost
# models (parameters, FLOPs) can treat `arch: hf` configs like native ones. Types not listed
# count as llama (gated MLP, RoPE): true of most current decoders, an estimate for the rest.
HF_FAMILY = {"gpt2": "gpt", "gpt_neo": "gpt", "gptj": "gpt", "opt": "gpt", "gpt_bigcode": "gpt"}


def default_d_ff(arch: str, d_model: int) -> int:
    """GPT: 4h. Llama: SwiGLU keeps the MLP's parameter count near 4h's by using 8h/3,
    rounded up to a multiple of 8 for friendlier matmul shapes."""
    if arch == "llama":
        return 8 * math.ceil(int(8 * d_model / 3) / 8)
    return 4 * d_model


@dataclasses.dataclass
class ModelArgs:
    arch: str = "gpt"                  # "gpt" (LayerNorm, GELU, learned positions) | "llama" (RMSNorm, SwiGLU, RoPE)
    vocab_size: int = 256              # tokens in the vocabulary
    d_model: int = 64                  # hidden size h
    n_layers: int = 2                  # transformer blocks L
    n_heads: int = 4                   # query heads a
    n_kv_heads: int | None = None      # key/value heads (grouped-query attention); None -> n_heads
    d_ff: int | None = None            # MLP inner size; None -> 4h (gpt) or SwiGLU 8h/3 rounded to 8 (llama)
    seq_len: int = 128                 # maximum positions
    dropout: float = 0.0               # embedding, attention and residual dropout probability
    norm_eps: float = 1e-5             # epsilon of LayerNorm / RMSNorm
    rope_theta: float = 10000.0        # RoPE base (llama only)
    tie_embeddings: bool = False       # lm_head.weight is tok_emb.weight

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"model.arch={self.arch!r} is not valid; expected one of {ARCHS}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name}={value!r} must be a positive integer")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.d_ff is None:
            self.d_ff = default_d_ff(self.arch, self.d_model)
        if self.d_model % self.n_heads:
            raise ValueError(
                f"model.d_model={self.d_model} must be divisible by model.n_heads={self.n_heads}")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        if self.d_ff < 1:
            raise ValueError(f"model.d_ff={self.d_ff} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim; d_model/n_heads={self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_config(cls, model_cfg: Any) -> "ModelArgs":
        """Copy the same-named fields from any object (or mapping), ignoring extra attributes.

        An `arch: hf` config maps to the native family with the same shapes
        (hf_model_type llama -> "llama", gpt2 -> "gpt"), so parameter and FLOP counts work for it.
        """
        get = model_cfg.get if isinstance(model_cfg, Mapping) else (
            lambda k, d=None: getattr(model_cfg, k, d))
        kwargs = {}
        for f in dataclasses.fields(cls):
            value = get(f.name, dataclasses.MISSING)
            if value is not dataclasses.MISSING:
                kwargs[f.name] = value
        if kwargs.get("arch") == "hf":
            kwargs["arch"] = HF_FAMILY.get(get("hf_model_type", None) or "llama", "llama")
            if kwargs["arch"] == "llama" and (kwargs.get("d_model", 64) // kwargs.get("n_heads", 4)) % 2:
                kwargs["arch"] = "gpt"  # an odd head size has no RoPE: count it as gpt
        return cls(**kwargs)
