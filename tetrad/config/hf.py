"""What a ``model`` section with ``arch: hf`` means, read from transformers itself.

Two questions only the installed transformers can answer, asked here so the rule book can
check a config before any process group exists:

* which ``model_type`` values build a causal LM (``model.hf_model_type``);
* the architecture of a local checkpoint (``model.hf_path``): its config.json, read with
  ``AutoConfig`` (whose ``attribute_map`` already turns GPT-2's ``n_embd`` into
  ``hidden_size`` and so on), projected onto tetrad's model keys.

Nothing here downloads: every call passes ``local_files_only``.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

from tetrad.config.errors import ConfigError

# tetrad model key -> attribute names that carry it in a transformers config, first found wins.
_KEYS = {
    "vocab_size": ("vocab_size",),
    "d_model": ("hidden_size",),
    "n_layers": ("num_hidden_layers",),
    "n_heads": ("num_attention_heads",),
    "n_kv_heads": ("num_key_value_heads",),
    "d_ff": ("intermediate_size", "n_inner", "ffn_dim"),
    "norm_eps": ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_eps"),
    "tie_embeddings": ("tie_word_embeddings",),
}
# Keys a checkpoint fixes: a config that gives one of them must agree with the checkpoint.
ARCH_KEYS = ("hf_model_type", *_KEYS, "rope_theta")


def transformers_module():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ConfigError("model.arch='hf' needs Hugging Face transformers: pip install transformers") from e
    return transformers


@lru_cache(maxsize=None)
def causal_lm_types() -> tuple[str, ...]:
    """Every ``model_type`` the installed transformers builds an AutoModelForCausalLM for."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return tuple(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))


def check_model_type(value: str) -> str | None:
    """A field check: None when ``value`` is a causal-LM model_type, else what is valid."""
    transformers_module()
    types = causal_lm_types()
    if value in types:
        return None
    close = [t for t in types if t.startswith(value[:3])][:6]
    return (f"a causal-LM model_type of transformers {transformers_module().__version__} "
            f"({len(types)} known{', e.g. ' + ', '.join(close) if close else ''})")


def load_hf_config(path: str):
    """The transformers config of the checkpoint directory ``path`` (ConfigError if unusable)."""
    where = f"model.hf_path={path!r}"
    if not os.path.isdir(path):
        raise ConfigError(f"{where}: not a directory; valid: a local directory holding config.json "
                          f"and *.safetensors (written by save_pretrained)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"{where}: no config.json in it; valid: a directory written by save_pretrained")
    tf = transformers_module()
    try:
        cfg = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as e:
        raise ConfigError(f"{where}: config.json cannot be read by transformers {tf.__version__}: {e}") from None
    if cfg.model_type not in causal_lm_types():
        raise ConfigError(f"{where}: model_type {cfg.model_type!r} has no causal-LM class in transformers "
                          f"{tf.__version__}; valid: one of AutoModelForCausalLM's model types")
    return cfg


def rope_theta(cfg) -> float | None:
    params = getattr(cfg, "rope_parameters", None)
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    value = getattr(cfg, "rope_theta", None)
    return None if value is None else float(value)


def shape_keys(cfg) -> dict[str, Any]:
    """tetrad model keys as a transformers config gives them (absent ones left out)."""
    out: dict[str, Any] = {"hf_model_type": cfg.model_type}
    for key, names in _KEYS.items():
        for name in names:
            value = getattr(cfg, name, None)
            if value is not None:
                out[key] = value
                break
    out.setdefault("n_kv_heads", out.get("n_heads"))
    if "d_ff" not in out and "d_model" in out:  # GPT-2 stores n_inner=None for 4h
        out["d_ff"] = 4 * out["d_model"]
    theta = rope_theta(cfg)
    if theta is not None:
        out["rope_theta"] = theta
    return out


def max_positions(cfg) -> int | None:
    return getattr(cfg, "max_position_embeddings", None)
