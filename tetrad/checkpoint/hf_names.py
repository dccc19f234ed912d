"""tetrad Transformer parameter names -> Hugging Face Llama / GPT-2 names.

The same correspondence tests/test_models.py checks logit-for-logit against transformers
(test_llama_matches_hf, test_gpt_matches_hf_gpt2); here it is a library function so export
can use it. GPT-2 differs in more than names: its Conv1D stores weights as [in, out], and
q, k, v are one fused c_attn projection.
"""

from __future__ import annotations

import torch

_LLAMA_LAYER = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight",
                **{f"attn.{n}.weight": f"self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "o_proj")},
                **{f"mlp.{n}.weight": f"mlp.{n}.weight" for n in ("gate_proj", "up_proj", "down_proj")}}


def llama_to_hf(sd: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    out = {"model.embed_tokens.weight": sd["tok_emb.weight"], "model.norm.weight": sd["norm.weight"]}
    if "lm_head.weight" in sd:  # absent when tied to the embedding
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(n_layers):
        for ours, theirs in _LLAMA_LAYER.items():
            out[f"model.layers.{i}.{theirs}"] = sd[f"layers.{i}.{ours}"]
    return out


def gpt_to_hf(sd: dict[str, torch.Tensor], n_layers: int) -> dict[str, torch.Tensor]:
    out = {"transformer.wte.weight": sd["tok_emb.weight"], "transformer.wpe.weight": sd["pos_emb.weight"],
           "transformer.ln_f.weight": sd["norm.weight"], "transformer.ln_f.bias": sd["norm.bias"]}
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i in range(n_layers):
        p, q = f"layers.{i}.", f"transformer.h.{i}."
        for a, b in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
            out[q + b + ".weight"], out[q + b + ".bias"] = sd[p + a + ".weight"], sd[p + a + ".bias"]
        qkv = [p + f"attn.{n}_proj" for n in "qkv"]
        out[q + "attn.c_attn.weight"] = torch.cat([sd[n + ".weight"] for n in qkv]).t().contiguous()
        out[q + "attn.c_attn.bias"] = torch.cat([sd[n + ".bias"] for n in qkv])
        for a, b in (("attn.o_proj", "attn.c_proj"), ("mlp.fc_in", "mlp.c_fc"), ("mlp.fc_out", "mlp.c_proj")):
            out[q + b + ".weight"] = sd[p + a + ".weight"].t().contiguous()
            out[q + b + ".bias"] = sd[p + a + ".bias"]
    return out


def to_hf(arch: str, sd: dict[str, torch.Tensor], n_layers: int) -> tuple[str, dict[str, torch.Tensor]]:
    """(hf_model_type, state dict with HF names) for a tetrad arch ('llama' | 'gpt' | 'hf')."""
    if arch == "llama":
        return "llama", llama_to_hf(sd, n_layers)
    if arch == "gpt":
        return "gpt2", gpt_to_hf(sd, n_layers)
    if arch == "hf":  # HFCausalLM keeps the HF model under `.hf`
        return "", {k.removeprefix("hf."): v for k, v in sd.items()}
    raise ValueError(f"model.arch={arch!r} has no Hugging Face export")
