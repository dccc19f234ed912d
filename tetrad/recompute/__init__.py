"""Activation recomputation: trade backward-pass compute for activation memory.

    from tetrad.recompute import apply_recompute
    apply_recompute(model, "selective")                      # or "none" | "full"
    apply_recompute(model, "budget", budget_bytes=2 << 30)   # per rank, one micro-batch

Policies, per transformer block (Korthikanti et al., arXiv:2205.05198):

* ``none``: autograd keeps every activation it needs (sbh(34 + 5as/h) bytes at 16 bits);
* ``selective``: keep the linear-layer outputs, recompute the attention core (34sbh);
* ``full``: keep only the block input (2sbh) and recompute the whole block in backward;
* ``budget``: the cheapest per-block mix of the three whose activations fit a budget.

The model is changed in place and keeps its parameter names (see ``wrap.py``). The engine
applies it after the pipeline prunes the model to its stage and tensor/sequence parallelism
slices the held layers, and before ZeRO takes the parameters over.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .budget import attention_core_share, default_costs, plan_budget
from .finder import find_attention_core, find_blocks
from .measure import graph_bytes, measure_layer_activation_bytes
from .policy import POLICIES, apply_block_policy, block_policy

MODES = (*POLICIES, "budget")

LayerMemory = Callable[[nn.Module], dict[str, int]]


def apply_recompute(model: nn.Module, policy: str, budget_bytes: int | None = None,
                    layer_memory: LayerMemory | None = None, *, batch_size: int = 1,
                    seq_shards: int = 1, costs: dict[str, float] | None = None) -> nn.Module:
    """Apply ``policy`` to every transformer block of ``model`` in place; returns ``model``.

    For ``budget``: ``budget_bytes`` is the activation memory the blocks may keep for one
    micro-batch of ``batch_size`` sequences on this rank; ``layer_memory(block)`` gives a
    block's bytes per policy (default: measured on the first block of each class with a
    [batch_size, seq_len / seq_shards, d_model] input: a block of a sequence-parallel model,
    Megatron-SP or Ulysses, receives only its rank's slice of the sequence); ``costs`` the
    recompute cost per policy in units of
    one block forward (default: full 1, selective the attention core's FLOP share).
    """
    if policy not in MODES:
        raise ValueError(f"strategy.recompute={policy!r} is not valid; expected one of {MODES}")
    if policy == "none" and not _has_blocks(model):
        return model  # any model trains without recomputation, transformer or not
    blocks = find_blocks(model)
    plan = [policy] * len(blocks)
    if policy == "budget":
        plan = _budget_plan(model, blocks, budget_bytes, layer_memory, batch_size, seq_shards, costs)
    for block, p in zip(blocks, plan):
        apply_block_policy(block, p)
    return model


def _has_blocks(model: nn.Module) -> bool:
    try:
        find_blocks(model)
    except TypeError:
        return False
    return True


def recompute_plan(model: nn.Module) -> list[str]:
    """The policy each block of ``model`` currently has."""
    return [block_policy(b) for b in find_blocks(model)]


def _budget_plan(model, blocks, budget_bytes, layer_memory, batch_size, seq_shards, costs) -> list[str]:
    if budget_bytes is None or budget_bytes <= 0:
        raise ValueError(f"strategy.recompute_budget_mb={budget_bytes!r}: recompute 'budget' "
                         f"needs a positive activation budget")
    seq_len, d_model = model_shape(model)
    measure = layer_memory or _measured_by_class(model, batch_size, seq_len // seq_shards, d_model)
    memories = [measure(b) for b in blocks]
    if costs is None:
        costs = default_costs(seq_len, d_model)
        if find_attention_core(blocks[0]) is None:  # HF: selective recomputes all of attention
            costs["selective"] = (2 * d_model + seq_len) / (6 * d_model + seq_len)
    return plan_budget(memories, int(budget_bytes), costs)


def model_shape(model: nn.Module) -> tuple[int, int]:
    """(seq_len, d_model) of a tetrad Transformer or an HFCausalLM."""
    args = getattr(model, "args", None)
    if args is not None:
        return args.seq_len, args.d_model
    cfg = getattr(getattr(model, "hf", model), "config", None)
    if cfg is not None:
        seq = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions")
        return seq, getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd")
    raise TypeError(f"recompute: cannot tell seq_len and d_model of {type(model).__name__}; "
                    f"give it an `args` (ModelArgs) or a Hugging Face `config`")


def _measured_by_class(model, batch_size, seq_len, d_model) -> LayerMemory:
    """Measure the first block of each class once; identical blocks reuse the numbers."""
    if hasattr(model, "hf"):
        raise ValueError("strategy.recompute='budget' on a Hugging Face model needs `layer_memory` "
                         "(its blocks need position and mask arguments to run alone); pass "
                         "per-policy bytes measured by the profiler")
    p = next(model.parameters())
    # A private generator: measuring must not move the RNG stream training will use.
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(batch_size, seq_len, d_model, generator=gen).to(p.device, p.dtype)
    cache: dict[type, dict[str, int]] = {}

    def measure(block: nn.Module) -> dict[str, int]:
        key = getattr(type(block), "_tetrad_base_class", type(block))
        if key not in cache:
            cache[key] = measure_layer_activation_bytes(block, sample)
        return cache[key]
    return measure


__all__ = ["MODES", "POLICIES", "apply_block_policy", "apply_recompute", "attention_core_share",
           "block_policy", "find_blocks", "measure_layer_activation_bytes", "model_shape",
           "graph_bytes", "plan_budget", "recompute_plan"]
