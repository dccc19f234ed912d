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
    "qwen3": dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
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


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def corpus(n: int, seed: int = 0) -> list[str]:
    """``n`` short English-like documents (the built-in grammar's lines)."""
    from tetrad.data import builtin_text

    lines = builtin_text(60 * n, seed).decode().splitlines()
    return [line.split(": ", 1)[1] for line in lines[:n]]


def make_tokenizer(out: str | Path, vocab_size: int = 301) -> Path:
    """A byte-level BPE tokenizer trained here on the built-in text, with an EOS token and a
    chat template, saved with save_pretrained (tokenizer.json, tokenizer_config.json)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|user|>", "<|assistant|>"])
    tok.train_from_iterator(corpus(2000, seed=9), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return Path(out)


def make_llama_for(tokenizer_dir: str | Path, out: str | Path, seed: int = 0, **shape) -> Path:
    """A small llama whose vocabulary is the tokenizer's (len(tokenizer): odd for most)."""
    import torch
    import transformers

    n = len(transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    kw = dict(FAMILIES["llama"], vocab_size=n, bos_token_id=None, eos_token_id=0, pad_token_id=None, **shape)
    cfg = transformers.AutoConfig.for_model("llama", **kw)
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return Path(out)
