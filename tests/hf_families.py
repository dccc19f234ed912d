"""Small Hugging Face checkpoints of several families, written locally with save_pretrained.

Nothing downloads: each config is built from transformers' own config class with tiny shapes
and randomly initialised with a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

# vocab 139: a trained tokenizer's odd size, not divisible by tp=2 (padded internally).
FAMILIES = {
    "llama": dict(vocab_size=139, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "qwen2": dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=True),
    "gpt2": dict(vocab_size=131, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gemma": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64),
    "phi3": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def make_checkpoint(family: str, out: str | Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """Write a randomly initialised ``family`` model to ``out`` (config.json + safetensors)."""
    import torch
    import transformers

    out = Path(out)
    cfg = transformers.AutoConfig.for_model(family, **FAMILIES[family])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(getattr(cfg, name, None), int) and getattr(cfg, name) >= cfg.vocab_size:
            setattr(cfg, name, None)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    return out
