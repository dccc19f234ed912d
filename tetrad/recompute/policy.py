"""Per-block recomputation policies: none, selective (attention core) and full (whole block).

Selective follows Korthikanti et al.: keep every linear-layer output, recompute only the
attention core (QK^T, softmax, softmax dropout, attention over V), the part whose memory grows
with s^2 and whose FLOPs are a small share of the layer's.

How: the tetrad block's ``CoreAttention`` module is checkpointed on its own, rather than the
whole block under PyTorch's selective-checkpoint API (``create_selective_checkpoint_contexts``
with a policy that recomputes the SDPA/softmax/dropout ops and saves the rest). Both were
measured (bench/recompute.py; docs/benchmarks.md, "Activation recomputation"): the SAC region
must also cache the output of *every* op it does not recompute, including ones autograd would
never save (RoPE intermediates, residual adds), so it kept 1.06x-8x the bytes of checkpointing
the core (more than no recomputation at all with dropout on), re-ran the whole block's Python in
backward, and refused Llama's in-place RMSNorm unless cache mutation is allowed. Checkpointing
the core keeps exactly q, k, v (which the core's backward needs anyway) and re-runs only it.

Hugging Face blocks have no attention-core module (the core is a function chosen by
``config._attn_implementation``), so selective there falls back to checkpointing the whole
attention submodule: it also recomputes the q/k/v/o projections (more compute than the paper's
selective, less memory), which the budget cost model accounts for.
"""

from __future__ import annotations

from torch import nn

from .finder import find_attention, find_attention_core
from .wrap import checkpoint_module, is_checkpointed, uncheckpoint_module

POLICIES = ("none", "selective", "full")


def selective_target(block: nn.Module) -> nn.Module:
    """The submodule selective recomputation checkpoints in ``block``."""
    core = find_attention_core(block)
    return core if core is not None else find_attention(block)


def clear_block(block: nn.Module) -> nn.Module:
    """Remove any recomputation from ``block`` and its submodules."""
    for m in block.modules():
        uncheckpoint_module(m)
    return block


def apply_block_policy(block: nn.Module, policy: str) -> nn.Module:
    """Set one block's policy in place (replacing any earlier one)."""
    if policy not in POLICIES:
        raise ValueError(f"recompute policy={policy!r} is not valid for a block; "
                         f"expected one of {POLICIES}")
    clear_block(block)
    if policy == "full":
        checkpoint_module(block)
    elif policy == "selective":
        checkpoint_module(selective_target(block))
    return block


def block_policy(block: nn.Module) -> str:
    """The policy currently applied to ``block``."""
    if is_checkpointed(block):
        return "full"
    if any(is_checkpointed(m) for m in block.modules()):
        return "selective"
    return "none"
