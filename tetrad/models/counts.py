"""Parameter and FLOP counts for cost models and throughput (MFU) reporting."""

from __future__ import annotations

from torch import nn

from .args import ModelArgs


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Distinct parameters (tied weights counted once); optionally without embedding tables."""
    skip = set()
    if exclude_embeddings:
        skip = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def flops_per_token(args: ModelArgs, seq_len: int | None = None) -> float:
    """Model FLOPs per trained token (forward + backward, no recomputation).

    Korthikanti et al. (arXiv:2205.05198; PAPERS.md "Model FLOPs"): per step
    72 B L s h^2 (1 + s/(6h) + V/(12 h L)), i.e. per token 72 L h^2 (1 + s/(6h) + V/(12 h L)).
    Its three terms are 3x the forward's: 2 FLOPs per weight of the layers' matmuls
    (24 h^2 per layer for MHA with d_ff = 4h), 4 s h per layer for QK^T and attention x V,
    and 2 V h for the logits. We count each term from the actual shapes so GQA and SwiGLU
    are right too; for a GPT with d_ff = 4h this equals the paper's formula exactly.
    """
    s = seq_len if seq_len is not None else args.seq_len
    h, hd, L = args.d_model, args.head_dim, args.n_layers
    attn_weights = h * (args.n_heads + 2 * args.n_kv_heads) * hd + args.n_heads * hd * h
    mlp_weights = (3 if args.arch == "llama" else 2) * h * args.d_ff
    forward = L * (2 * (attn_weights + mlp_weights) + 4 * s * args.n_heads * hd) + 2 * args.vocab_size * h
    return 3.0 * forward
