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


def activation_bytes(s: float, b: int, h: int, a: int, *, t: int = 1, policy: str = "none",
                     megatron_sp: bool = False, bytes_per_element: int = 2) -> float:
    """Activation bytes one transformer layer keeps for backward: Korthikanti et al.
    (arXiv:2205.05198; PAPERS.md "Activation memory"), the one home of the formula.

    For sequence length ``s``, micro-batch ``b``, hidden ``h``, ``a`` heads and tensor
    parallelism ``t``, at 16 bits with 1-byte dropout masks:

    * ``none``: sbh(10 + 24/t + 5as/(ht)), or with Megatron-SP (sbh/t)(34 + 5as/h);
    * ``selective`` (the attention core recomputed, or a kernel that saves no s x s
      matrices): sbh(10 + 24/t), or with Megatron-SP 34sbh/t;
    * ``full`` (only the layer input kept): 2sbh, or 2sbh/t with Megatron-SP.

    ``bytes_per_element=4`` scales everything by 2 (fp32; an approximation, since the paper's
    masks stay 1 byte).
    """
    sbh, seq = s * b * h, megatron_sp and t > 1
    core = 5 * a * s / h
    per = {"none": sbh / t * (34 + core) if seq else sbh * (10 + 24 / t + core / t),
           "selective": 34 * sbh / t if seq else sbh * (10 + 24 / t),
           "full": 2 * sbh / (t if seq else 1)}
    if policy not in per:
        raise ValueError(f"policy={policy!r} is not valid; expected one of {sorted(per)}")
    return per[policy] * bytes_per_element / 2
