"""ZeRO++'s two quantized collectives (Wang et al., arXiv:2306.10209), on explicit groups.

qwZ, ``quantized_all_gather``: each rank quantizes its parameter shard block-wise to int8
(``tetrad.zero.quant``), the int8 values and fp32 block scales are all-gathered, and every
rank dequantizes every shard, its own included, so all ranks compute with the same weights.
Quantization is deterministic: gathering the same shard again (stage 3's backward gather)
gives bit-identical weights, so autograd's saved tensors stay consistent. The fp32 masters
are never quantized; only the copy used for compute is. Error per weight <= max|w_block|/254.

qgZ, ``quantized_reduce_scatter``: the average of ``flat`` over the n = k * m ranks of a
ZeRO group that spans m nodes with k members each, as a hierarchical all-to-all: (1) within
the node, rank (i, j) sends to its node peer j' the chunks that (i', j') own for every node
i', quantized; each rank dequantizes and sums the k contributions in fp32 (a node-level
partial of m chunks); (2) across nodes, among the ranks with the same local index j, each
sends chunk i' of its partial to node i', quantized again; the m partials are dequantized
and summed in fp32. Inter-node volume per rank: (m - 1)/m of M/k elements at 1 byte, against
(m - 1)/m * M elements at the compute dtype for a flat reduce-scatter (with M the gradient
elements per rank). Error per element: two roundings, each at most half an int8 step of its
block, so |error| <= (sum_r max|g_r|/n + sum_i max|P_i|) / 254 <= 2 max_r ||g_r||_inf / 254
(with g_r the ranks' gradients and P_i the node partials; ``qgz_error_bound``).

The ZeRO group's rank r must be node i = r // k, local index j = r % k: ``intra`` holds the
k members on this node, ``inter`` the m members with this local index, both in rank order
(the engine builds them so from the layout).
"""

from __future__ import annotations

import torch

from tetrad.traffic import Traffic
from tetrad.zero.comm import Then, all_gather, all_to_all, group_size
from tetrad.zero.quant import BLOCK, dequantize_rows, quantize, quantize_rows


def quantized_all_gather(out: torch.Tensor, shard: torch.Tensor, group, traffic: Traffic | None = None,
                         block: int = BLOCK) -> Then:
    """Asynchronously: ``out`` (compute dtype, n * len(shard)) = every rank's dequantized shard."""
    n, size = group_size(group), shard.numel()
    q, scales = quantize(shard, block)
    q_all = torch.empty(n * q.numel(), dtype=torch.int8, device=shard.device)
    s_all = torch.empty(n * scales.numel(), dtype=torch.float32, device=shard.device)
    handles = [all_gather(q_all, q, group, traffic), all_gather(s_all, scales, group, traffic)]

    def finish() -> None:
        values = dequantize_rows(q_all.view(n, -1), s_all.view(n, -1), size, block)
        out.view(n, size).copy_(values)

    return Then(handles, finish)


def _quantized_exchange(rows: torch.Tensor, group, traffic: Traffic | None, block: int):
    """Row j of ``rows`` [g, c] (fp32) to member j, quantized: (handles, result() -> [g, c] fp32,
    row i what member i sent)."""
    g, c = rows.shape
    q, scales = quantize_rows(rows, block)
    q_in, s_in = torch.empty_like(q), torch.empty_like(scales)
    handles = [all_to_all(q_in, q, group, traffic), all_to_all(s_in, scales, group, traffic)]
    return handles, lambda: dequantize_rows(q_in, s_in, c, block)


def quantized_reduce_scatter(out: torch.Tensor, flat: torch.Tensor, intra, inter,
                             traffic: Traffic | None = None, block: int = BLOCK) -> Then:
    """``out`` = this rank's 1/n chunk of the average of ``flat`` over the k * m ranks (see
    the module doc); the first all-to-all starts now, the second when its handle is waited."""
    k, m, size = group_size(intra), group_size(inter), out.numel()
    x = flat.to(torch.float32).view(m, k, size) / (k * m)
    send = x.transpose(0, 1).reshape(k, m * size)  # row j': chunks (i', j') for every node i'
    if k == 1:
        handles, first = [], lambda: send
    else:
        handles, first = _quantized_exchange(send, intra, traffic, block)

    def finish() -> None:
        partial = first().sum(dim=0, dtype=torch.float32) if k > 1 else send[0]
        if m == 1:
            out.copy_(partial)
            return
        second, result = _quantized_exchange(partial.view(m, size), inter, traffic, block)
        for h in second:
            h.wait()
        out.copy_(result().sum(dim=0, dtype=torch.float32))

    return Then(handles, finish)


def qgz_error_bound(grads: list[torch.Tensor], k: int) -> float:
    """The bound of the module doc for the averaged gradients ``grads`` (one per rank, rank
    order, k per node): (sum_r max|g_r / n| + sum_i max|P_i|) / 254 with a 1/254 allowance
    for the first rounding's effect on the second's scale."""
    n = len(grads)
    first = sum(float(g.abs().max()) for g in grads) / n
    partials = [sum(grads[i * k:(i + 1) * k]) / n for i in range(n // k)]
    second = sum(float(p.abs().max()) for p in partials) * (1 + 1 / 254)
    return (first + second) / 254 + 1e-7 * max(float(g.abs().max()) for g in grads)
