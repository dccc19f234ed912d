"""Hugging Face causal LMs behind the same forward(input_ids) -> logits interface.

Two sources, both any ``AutoModelForCausalLM`` architecture the installed transformers knows:

* ``model.hf_path``: a local checkpoint. The model is built on the meta device (no weight
  exists yet) and remembers the directory in ``checkpoint``; the engine prunes and slices it
  for this rank and then streams only this rank's part from the safetensors files
  (``tetrad.checkpoint.hf_weights``).
* ``model.hf_model_type``: a config built from the ``model`` section's keys, randomly
  initialised by transformers (the same for a given seed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from tetrad.config.hf import load_hf_config, transformers_module

from .args import ModelArgs

# Config attributes that hold a dropout probability; `model.dropout` (a training choice, not
# part of the architecture) sets every one the config has.
_DROPOUTS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
             "embed_dropout", "activation_dropout", "dropout", "summary_first_dropout")
_EPS = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "norm_eps")


class HFCausalLM(nn.Module):
    """Adapter so the trainer treats HF models like native ones; the HF model is `self.hf`.

    ``checkpoint``: the directory the weights stream from (None: the weights are already here).
    """

    def __init__(self, hf_model: nn.Module, checkpoint: str | None = None):
        super().__init__()
        self.hf = hf_model
        self.checkpoint = checkpoint

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=input_ids, use_cache=False).logits

    def checkpoint_name(self, name: str) -> str:
        """The checkpoint's name for parameter ``name`` of this module."""
        return name.removeprefix("hf.")

    def tied_aliases(self) -> dict[str, list[str]]:
        """checkpoint name -> the other names of the same tied tensor (``save_pretrained``
        keeps one of them)."""
        ties = getattr(self.hf, "all_tied_weights_keys", None) or getattr(self.hf, "_tied_weights_keys", None)
        if not isinstance(ties, Mapping) or not getattr(self.hf.config, "tie_word_embeddings", False):
            return {}
        out: dict[str, list[str]] = {}
        for a, b in ties.items():
            out.setdefault(a, []).append(b)
            out.setdefault(b, []).append(a)
        return out

    @torch.no_grad()
    def init_buffers(self, device: torch.device) -> None:
        """Give every meta buffer real values on ``device``, with transformers' own per-module
        init (``_init_weights``: RoPE frequencies, Gemma's embedding scale), which is what
        ``from_pretrained`` does for buffers a checkpoint does not store. Parameters stay on
        the meta device. A buffer no init fills is an error, never garbage."""
        owners = [m for m in self.hf.modules() if any(b is not None and b.is_meta for b in m.buffers(False))]
        for module in owners:
            for key, b in module._buffers.items():
                if b is not None and b.is_meta:
                    filled = torch.full(b.shape, float("nan"), dtype=b.dtype, device=device) \
                        if b.is_floating_point() else torch.zeros(b.shape, dtype=b.dtype, device=device)
                    module._buffers[key] = filled
            self.hf._init_weights(module)
            for key, b in module._buffers.items():
                if b is not None and b.is_floating_point() and torch.isnan(b).any():
                    raise ValueError(f"{type(module).__name__}.{key}: transformers' _init_weights does not "
                                     f"initialise this buffer, and a meta-device build has no value for it; "
                                     f"build the model on a real device (it is then not streamed)")


def _get(cfg: Any, key: str) -> Any:
    return cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)


def _set_first(cfg, names: tuple[str, ...], value) -> None:
    for name in names:
        if hasattr(cfg, name):
            setattr(cfg, name, value)
            return


def _training_choices(cfg, model_cfg: Any):
    dropout = _get(model_cfg, "dropout") or 0.0
    for name in _DROPOUTS:
        if isinstance(getattr(cfg, name, None), float):
            setattr(cfg, name, float(dropout))
    cfg.use_cache = False
    return cfg


def _built_config(model_cfg: Any):
    """A transformers config of ``model.hf_model_type`` with the ``model`` section's shape."""
    tf = transformers_module()
    hf_type = _get(model_cfg, "hf_model_type") or "llama"
    args = ModelArgs.from_config(model_cfg)  # validates and fills n_kv_heads / d_ff defaults
    cfg = tf.AutoConfig.for_model(hf_type)
    for name, value in (("vocab_size", args.vocab_size), ("hidden_size", args.d_model),
                        ("num_hidden_layers", args.n_layers), ("num_attention_heads", args.n_heads),
                        ("max_position_embeddings", args.seq_len),
                        ("tie_word_embeddings", args.tie_embeddings)):
        setattr(cfg, name, value)  # attribute_map turns these into GPT-2's n_embd, n_layer, ...
    if hasattr(cfg, "num_key_value_heads"):
        cfg.num_key_value_heads = args.n_kv_heads
    elif args.n_kv_heads != args.n_heads:
        raise ValueError(f"model.n_kv_heads={args.n_kv_heads}: {hf_type} has no grouped-query "
                         f"attention; use n_kv_heads=null or {args.n_heads}")
    _set_first(cfg, ("intermediate_size", "n_inner", "ffn_dim"), args.d_ff)
    _set_first(cfg, _EPS, args.norm_eps)
    if hasattr(cfg, "head_dim"):
        cfg.head_dim = args.head_dim
    if isinstance(getattr(cfg, "rope_parameters", None), dict):
        cfg.rope_parameters = {**cfg.rope_parameters, "rope_theta": args.rope_theta}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):  # defaults may exceed a small vocab
        if isinstance(getattr(cfg, name, None), int) and getattr(cfg, name) >= args.vocab_size:
            setattr(cfg, name, None)
    return cfg


def hf_config(model_cfg: Any):
    """The transformers config of a ``model`` section (never downloads): the checkpoint's own
    with ``hf_path``, else one built for ``hf_model_type``; dropout is the section's."""
    path = _get(model_cfg, "hf_path")
    cfg = load_hf_config(path) if path else _built_config(model_cfg)
    return _training_choices(cfg, model_cfg)


def build_hf(model_cfg: Any, seed: int = 0) -> HFCausalLM:
    """An ``HFCausalLM``: on the meta device, to be streamed from ``hf_path``; or randomly
    initialised (``hf_model_type``), the same for a given seed whatever the global RNG."""
    tf = transformers_module()
    config = hf_config(model_cfg)
    path = _get(model_cfg, "hf_path")
    if path:
        with torch.device("meta"):
            return HFCausalLM(tf.AutoModelForCausalLM.from_config(config), checkpoint=str(path))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = tf.AutoModelForCausalLM.from_config(config)
    return HFCausalLM(model)
