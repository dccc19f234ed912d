"""Sequence-sharded attention inside Hugging Face models: one attention function for
context parallelism (ring attention over cp), Ulysses (all-to-all over sp) and Megatron-SP.

A Hugging Face attention module computes q, k, v (and applies RoPE) itself, then calls the
function ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`` on [b, heads, n, d] tensors
(K/V not yet repeated for GQA). tetrad registers one more implementation, ``tetrad_ring``,
that runs the module's ``tetrad_ring`` (set here on each attention module: no process group
lives in a global): Ulysses' all-to-all around either the ring over the cp group or a plain
causal core, and a mask function that builds no mask (the core applies causality itself,
across ranks for the ring). Hugging Face would build its mask for the local token count,
which under every one of these layouts differs from the count attention sees.

Positions follow the rank's tokens: a pre-hook on the rotary embedding module (Llama:
``rotary_emb(x, position_ids)``) or on the learned position table (GPT-2:
``wpe(position_ids)``) replaces the default 0..n-1 by the layout's positions, so the same
hooks serve a whole model and a pipeline stage. Under Megatron-SP the residual stream holds
1/tp of the rank's tokens while attention runs on all of them (its input is all-gathered
over tp): the rotary table then covers the gathered tokens, the position table only this tp
rank's slice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tetrad.parallel.comm import gather_from_sequence
from tetrad.parallel.context import RingAttention
from tetrad.parallel.sequence import SequenceParallelReplicated, UlyssesAttention

IMPLEMENTATION = "tetrad_ring"


def _ring_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    ring = getattr(module, "tetrad_ring", None)
    if ring is None:
        raise RuntimeError(f"{type(module).__name__} runs attention '{IMPLEMENTATION}' but has no "
                           f"ring attached: build the model's parallel form with tetrad.parallel.plan")
    if kwargs.get("sliding_window") or getattr(module, "sliding_window", None):
        raise RuntimeError(f"{type(module).__name__} attends within a sliding window, which tetrad's "
                           f"sequence-sharded attention does not implement: use strategy.cp=1, sp=1 "
                           f"and megatron_sp=false for this model")
    if dropout:
        raise RuntimeError(f"{type(module).__name__} applies attention dropout {dropout}, which tetrad's "
                           f"sequence-sharded attention does not implement: set the model's attention "
                           f"dropout to 0 (model.dropout: 0.0) or use strategy.cp=1, sp=1, megatron_sp=false")
    return ring(query, key, value, scale=scaling).transpose(1, 2).contiguous(), None


class CausalCore(nn.Module):
    """Causal attention over the whole local sequence (what Ulysses or Megatron-SP hand it),
    GQA K/V taken un-repeated (torch's SDPA repeats them)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                              enable_gqa=k.shape[1] != q.shape[1])


class HFUlysses(UlyssesAttention):
    """Ulysses for an HF attention function: K/V heads that sp does not divide (GQA with few
    K/V heads per tp rank) are repeated to the query heads first, as each query head's K/V."""

    def forward(self, q, k, v, scale=None):
        world = torch.distributed.get_world_size(self.group)
        if k.shape[1] % world:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return super().forward(q, k, v, scale=scale)


def _no_mask(*args, **kwargs):
    return None


def register() -> None:
    """Make ``tetrad_ring`` a Hugging Face attention implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(IMPLEMENTATION, _ring_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, _no_mask)


def _positions_hook(positions):
    """Pre-hook replacing a ``position_ids`` input ([1, n] or [b, n]) by the rank's positions
    (which under Megatron-SP may be more than n: the rotary table's)."""

    def rows(ids):
        return positions(ids.shape[-1], ids.device).expand(*ids.shape[:-1], -1)

    def hook(mod, args, kwargs):
        if "position_ids" in kwargs:
            kwargs = {**kwargs, "position_ids": rows(kwargs["position_ids"])}
        elif len(args) > 1:  # rotary_emb(x, position_ids)
            args = (args[0], rows(args[1]), *args[2:])
        else:  # wpe(position_ids)
            args = (rows(args[0]), *args[1:])
        return args, kwargs

    return hook


def _core(layout) -> nn.Module:
    core = RingAttention(None, layout.cp_group, balance=layout.cp_balance) if layout.cp > 1 else CausalCore()
    return HFUlysses(core, layout.sp_group) if layout.sp > 1 else core


def _positions(layout, table: bool):
    """(n, device) -> the positions a hook gives a module seeing n tokens. Without Megatron-SP:
    the rank's tokens. With it, n is 1/tp of them: the rotary table (used after attention's
    all-gather) gets all of them, the position table (added to the residual) this tp rank's."""
    if not layout.seq:
        return layout.positions
    tp, rank = layout.tp, torch.distributed.get_rank(layout.tp_group)

    def positions(n, device):
        full = layout.positions(n * tp, device)
        return full[rank * n:(rank + 1) * n] if table else full

    return positions


def _sequence_replicated(hf: nn.Module, layout) -> None:
    """Under Megatron-SP every norm, and the learned position table, sees this rank's slice of
    the sequence: their weights get only that slice's gradient, so they enter through
    copy_to_region (summed over tp)."""
    for name, m in list(hf.named_modules()):
        norm = "Norm" in type(m).__name__ and not any(True for _ in m.children())
        if (norm and any(True for _ in m.parameters(False))) or name.endswith("wpe"):
            parent, _, attr = name.rpartition(".")
            setattr(hf.get_submodule(parent), attr, SequenceParallelReplicated(m, layout.tp_group))


def _gather_after_final_norm(hf: nn.Module, layout) -> None:
    """Under Megatron-SP the sequence is gathered at the output of the base model's final norm,
    not at the head: code after that norm may reshape by the full sequence length (GPT-2 views
    its output as [-1, n, hidden]). The vocab-parallel head then enters with no collective of
    its own; the gather's backward sums the heads' partial input gradients over tp."""
    base = getattr(hf, getattr(hf, "base_model_prefix", ""), hf)
    final = [m for m in base.children()
             if isinstance(m, SequenceParallelReplicated) and "Norm" in type(m.inner).__name__]
    head = hf.get_output_embeddings()
    if len(final) != 1 or not hasattr(head, "input_mode"):
        raise TypeError(f"strategy.megatron_sp: {type(hf).__name__} has {len(final)} norms directly under "
                        f"its base model (need exactly one final norm before a vocab-parallel head)")
    final[0].register_forward_hook(lambda mod, args, out: gather_from_sequence(out, layout.tp_group,
                                                                               traffic=layout.traffic))
    head.input_mode = "none"


def apply_hf_context(model: nn.Module, layout) -> nn.Module:
    """Sequence-sharded attention (ring over ``layout.cp_group``, Ulysses over
    ``layout.sp_group``, or the plain causal core under Megatron-SP) in every attention
    module of a Hugging Face causal LM (bare or inside ``HFCausalLM``), positions that follow
    the rank's tokens, and under Megatron-SP norms whose gradients are summed over tp."""
    register()
    hf = getattr(model, "hf", model)
    what = "strategy.cp > 1" if layout.cp > 1 else "strategy.sp > 1" if layout.sp > 1 else "strategy.megatron_sp"
    attention = [m for m in hf.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    if not attention:
        raise TypeError(f"{what}: found no attention modules in {type(hf).__name__}")
    for m in attention:
        m.tetrad_ring = _core(layout)
    hf.config._attn_implementation = IMPLEMENTATION
    if layout.seq:
        _sequence_replicated(hf, layout)
        _gather_after_final_norm(hf, layout)
    hooked = 0
    for name, m in hf.named_modules():
        table = name.endswith("wpe")
        if type(m).__name__.endswith("RotaryEmbedding") or table:
            m.register_forward_pre_hook(_positions_hook(_positions(layout, table)), with_kwargs=True)
            hooked += 1
    split = hasattr(model, "stage_replicas")  # a pipeline stage: positions may live on another one
    if not hooked and not split:
        raise TypeError(f"{what}: {type(hf).__name__} has no rotary embedding or position "
                        f"table ('*RotaryEmbedding', '*.wpe') whose positions tetrad can set")
    return model
