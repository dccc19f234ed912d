"""One transformer layer on one rank, operation by operation: what it computes and what it keeps.

The spec cost model prices a layer as the sum of its operations (``tetrad.strategy.spec_costs``)
and sizes its activations from the tensors autograd keeps for backward (``tetrad.strategy.memory``);
both come from this one inventory, so a change of shape, kernel or recompute policy moves time
and memory together. Shapes are tetrad's own blocks (``tetrad.models.transformer``): separate
q, k, v and output projections; GPT: LayerNorm, GELU MLP (biases in the GEMM epilogue);
Llama: RMSNorm, RoPE on q and k, SwiGLU (gate and up projections).

A rank of tensor-parallel degree t holds heads/t (and kv_heads/t) heads and d_ff/t of the MLP;
Ulysses degree u runs the projections on s/u tokens and the attention core on all s tokens
with heads/(t u); Megatron-SP also splits the norm and residual regions' tokens by t.

Saved tensors (bytes per token of the rank's projection tokens), after Korthikanti et al.
(arXiv:2205.05198, section 4.1), with flash attention keeping only q, k, v, the output and one
fp32 log-sum-exp per head instead of the s x s scores (the math kernel keeps the softmax
output, and with dropout its mask and output):

    GPT:   2 norm inputs, 2 projection inputs (norm outputs)       4h         (replicated over t)
           q, k, v; attention output (= output projection input)   (a+2kv)d/t + a d/t
           GELU input and output (= second MLP input)              2 f/t
           dropout masks (1 byte, residual and MLP), with dropout   2h
    Llama: the same norms and projection inputs                   4h
           q, k (after RoPE), v; attention output                 (a+2kv)d/t + a d/t
           gate and up outputs, SiLU output, their product        4 f/t

For GPT with d_ff = 4h, MHA and dropout this is the paper's 34 s b h (10 + 24/t with tp).
Recompute policies (``saved_bytes``): none keeps everything; selective (tetrad's: the attention
core is checkpointed) drops what the core keeps beyond its inputs (the log-sum-exp, or the
scores); full keeps the layer input only; two further policies price other frameworks'
published runs (never proposed by the search): ``op_sac`` (torchtitan's per-op selective
checkpointing: the region input, every odd-numbered matmul's output in execution order, the
attention output and log-sum-exp) and ``every_2nd`` (full recomputation on every second layer).
"""

from __future__ import annotations

from dataclasses import dataclass

from tetrad.models.args import ModelArgs

EXTRA_POLICIES = ("op_sac", "every_2nd")     # priced for published runs; the engine runs the rest


@dataclass(frozen=True)
class Gemm:
    name: str
    m: float
    n: float
    k: float


@dataclass(frozen=True)
class LayerWork:
    """Forward work of one layer on one rank for one micro-batch."""

    gemms: tuple[Gemm, ...]
    attn_flops: float          # 4 b s^2 (heads_local * head_dim): QK^T and PV, unmasked
    attn_seq: float            # keys each query attends to (s)
    attn_heads: float          # b * local heads (for the math kernel's batched GEMMs)
    eltwise_elems: float       # elements read + written by norms, residuals, activations, RoPE
    tokens: float              # tokens through the projections (b s / u)


def _dims(a: ModelArgs, tp: int):
    hd = a.head_dim
    return a.n_heads * hd / tp, a.n_kv_heads * hd / tp, a.d_ff / tp


def layer_work(a: ModelArgs, tp: int, sp: int, b: int, msp: bool = False) -> LayerWork:
    """The GEMMs (m, n, k), attention FLOPs and element-wise traffic of one layer's forward."""
    tokens = b * a.seq_len / sp
    q, kv, f = _dims(a, tp)
    h = a.d_model
    gemms = [Gemm("q", tokens, q, h), Gemm("k", tokens, kv, h), Gemm("v", tokens, kv, h),
             Gemm("o", tokens, h, q)]
    if a.arch == "llama":
        gemms += [Gemm("gate", tokens, f, h), Gemm("up", tokens, f, h), Gemm("down", tokens, h, f)]
        act = 4 * f + 2 * (q + kv)           # SiLU(gate) * up: read 2, write 2; RoPE on q, k
    else:
        gemms += [Gemm("fc_in", tokens, f, h), Gemm("fc_out", tokens, h, f)]
        act = 2 * f                           # GELU: read, write
    rep = h / (tp if msp else 1)              # norm and residual regions
    norms_residual = 2 * 2 * rep + 2 * 3 * rep
    drop = 2 * 2 * rep if a.dropout > 0 else 0.0
    heads_local = a.n_heads / (tp * sp)
    return LayerWork(tuple(gemms), 4 * b * a.seq_len ** 2 * heads_local * a.head_dim, a.seq_len,
                     b * heads_local, tokens * (act + norms_residual + drop), tokens)


def saved_per_token(a: ModelArgs, tp: int, sp: int, elem: int, kernel: str = "flash",
                    msp: bool = False) -> dict[str, float]:
    """Bytes per projection token of each tensor group a layer keeps with no recomputation."""
    q, kv, f = _dims(a, tp)
    h = a.d_model
    rep = h / (tp if msp else 1)
    out = {"layer_input": elem * rep,                         # first norm's input
           "norms_and_inputs": elem * 3 * rep,                # second norm's input, 2 projection inputs
           "qkv": elem * (q + 2 * kv), "attn_out": elem * q}
    heads = a.n_heads / tp
    if kernel == "flash":
        out["core_extra"] = 4.0 * heads                       # fp32 log-sum-exp per head
    else:
        s = a.seq_len                                         # scores over all keys (Ulysses: all s)
        scores = heads * s * (elem + ((1 + elem) if a.dropout > 0 else 0))
        out["core_extra"] = scores
    out["mlp"] = elem * (4 * f if a.arch == "llama" else 2 * f)
    if a.dropout > 0:
        out["dropout_masks"] = 2.0 * rep
    return out


def _odd_mm_outputs(a: ModelArgs, tp: int, elem: int) -> float:
    """Bytes per token of the outputs of the 1st, 3rd, 5th, ... matmul of a layer (op_sac)."""
    q, kv, f = _dims(a, tp)
    h = a.d_model
    order = [q, kv, kv, h] + ([f, f, h] if a.arch == "llama" else [f, h])
    return elem * sum(n for i, n in enumerate(order) if i % 2 == 0)


def saved_bytes(a: ModelArgs, tp: int, sp: int, b: int, policy: str, elem: int,
                kernel: str = "flash", msp: bool = False) -> float:
    """Activation bytes one layer keeps for backward for one micro-batch under ``policy``."""
    tokens = b * a.seq_len / sp
    parts = saved_per_token(a, tp, sp, elem, kernel, msp)
    if policy == "none":
        per = sum(parts.values())
    elif policy == "selective":
        per = sum(v for k, v in parts.items() if k != "core_extra")
    elif policy == "full":
        per = parts["layer_input"]
    elif policy == "op_sac":
        per = parts["layer_input"] + _odd_mm_outputs(a, tp, elem) + parts["attn_out"] + \
            (parts["core_extra"] if kernel == "flash" else 0.0)
    elif policy == "every_2nd":
        per = 0.5 * (parts["layer_input"] + sum(parts.values()))
    else:
        raise ValueError(f"recompute policy {policy!r} is not priced; valid: none, selective, full, "
                         f"{', '.join(EXTRA_POLICIES)}")
    return per * tokens


def recomputed(work: LayerWork, policy: str) -> tuple[list[Gemm], float, float, float]:
    """(GEMMs re-run in backward, and the shares of them, of the attention forward and of the
    element-wise forward that are re-run) under ``policy``; averaged over layers for every_2nd."""
    gemms = list(work.gemms)
    if policy == "full":
        return gemms, 1.0, 1.0, 1.0
    if policy == "every_2nd":
        return gemms, 0.5, 0.5, 0.5
    if policy == "selective":
        return [], 0.0, 1.0, 0.0
    if policy == "op_sac":
        return [g for i, g in enumerate(gemms) if i % 2 == 1], 1.0, 0.0, 1.0
    return [], 0.0, 0.0, 0.0
