"""Where the transformer blocks and their attention cores live, for each model family we know.

Recomputation wraps whole blocks (full) or the attention core inside each block (selective);
this is the one place that knows how to find them, so that a new model family is one entry.
"""

from __future__ import annotations

from torch import nn

from tetrad.models.transformer import CoreAttention

# (description, attribute path from the model to the ModuleList of blocks). The first path
# that resolves to an nn.ModuleList wins.
BLOCK_PATHS: tuple[tuple[str, str], ...] = (
    ("tetrad Transformer", "layers"),
    ("Hugging Face Llama-style (HFCausalLM)", "hf.model.layers"),
    ("Hugging Face GPT-2 (HFCausalLM)", "hf.transformer.h"),
    ("bare Hugging Face Llama-style", "model.layers"),
    ("bare Hugging Face GPT-2", "transformer.h"),
)

# Attribute names of the attention submodule inside a block: tetrad, HF Llama, HF GPT-2.
ATTENTION_NAMES: tuple[str, ...] = ("attn", "self_attn")


def get_path(model: nn.Module, path: str) -> nn.Module | None:
    """The submodule (or attribute) at dotted ``path``, None where any part is missing."""
    node = model
    for part in path.split("."):
        node = getattr(node, part, None)
        if node is None:
            return None
    return node


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer blocks, in order.

    Raises TypeError naming the paths tried and where to add a new one.
    """
    for _, path in BLOCK_PATHS:
        blocks = get_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    tried = ", ".join(f"model.{p}" for _, p in BLOCK_PATHS)
    raise TypeError(f"recompute: cannot find the transformer blocks of {type(model).__name__}; "
                    f"tried {tried}. Add the attribute path of its nn.ModuleList of blocks to "
                    f"BLOCK_PATHS in tetrad/recompute/finder.py")


def find_attention_core(block: nn.Module) -> nn.Module | None:
    """The parameter-free attention core of a tetrad block (CoreAttention), else None.

    Searched through all submodules, so a core that sequence parallelism has wrapped (e.g. an
    all-to-all module holding the local CoreAttention) is still found, and recomputing it
    repeats only local work, never the communication around it.
    """
    cores = [m for m in block.modules() if isinstance(m, CoreAttention)]
    return cores[-1] if cores else None


def find_attention(block: nn.Module) -> nn.Module:
    """The whole attention submodule of a block (projections included)."""
    for name in ATTENTION_NAMES:
        attn = getattr(block, name, None)
        if isinstance(attn, nn.Module):
            return attn
    raise TypeError(f"recompute: block {type(block).__name__} has no attention submodule named "
                    f"any of {ATTENTION_NAMES}; add its name to ATTENTION_NAMES in "
                    f"tetrad/recompute/finder.py")
