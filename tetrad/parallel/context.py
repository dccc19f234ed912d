"""Context parallelism: ring attention over the ``cp`` mesh axis (Li et al., arXiv:2105.13120;
Liu et al., ring attention; Megatron-Core's and torchtitan's context parallel).

Each of C ranks holds 1/C of every sequence everywhere, attention included. Inside attention
the K/V blocks travel around the ring (C-1 hops, each overlapped with one block's attention)
and the partial softmax results merge exactly by their log-sum-exp:
``o = (e^(l1-l) o1 + e^(l2-l) o2)``, ``l = log(e^l1 + e^l2)``. Backward walks the ring again
with the saved output and log-sum-exp (flash-attention's backward: ``dS = P (dP - D)``,
``D = rowsum(dO * O)``), and each block's dK/dV accumulator travels with it back to its owner
(C hops), so nothing of size s x s is ever kept: per rank the layer keeps q, k, v, o and the
log-sum-exp of its own s/C tokens.

Causal load balance ("zigzag"): the sequence is cut into 2C chunks and rank r holds chunks r
and 2C-1-r, so every rank does the same work at every ring step (one full n x n/2 block), where
a contiguous split leaves rank C-1 with C blocks and rank 0 with one. The split is data: the
caller shards token ids, labels and positions with ``shard_sequence`` / ``local_positions``.

Why our own and not ``torch.distributed.tensor.experimental.context_parallel``: that one
swaps SDPA for DTensor-dispatched CUDA kernels (flash / efficient / cuDNN) and buffers
re-sharded in place; tetrad needs it on gloo/CPU (its tests), on plain tensors inside
existing modules (its Llama/GPT and Hugging Face attention), with GQA K/V sent un-repeated,
and composed with Ulysses inside the same attention call. The block kernel here is plain
PyTorch math (scores per block, recomputed in backward); a fused kernel returning the
log-sum-exp can replace ``_block_forward``/``_block_backward`` without touching the ring.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd import Function

from tetrad.parallel.comm import Counted, RingPass

# Ring steps are one of: the rank's own block (causal inside), a past block seen whole by all
# local queries ("all"), a past block seen whole only by the local second half ("late"), or a
# block nobody here may see ("skip").
DIAG, ALL, LATE_QUERIES, EARLY_KEYS, SKIP = "diag", "all", "late_q", "early_k", "skip"


# ------------------------------------------------------------------ the sequence split
def shard_sequence(x: torch.Tensor, dim: int, cp: int, rank: int, balance: bool) -> torch.Tensor:
    """This cp rank's part of ``x`` along ``dim``: chunks r and 2C-1-r of 2C (balance) or
    chunk r of C."""
    if cp == 1:
        return x
    parts = 2 * cp if balance else cp
    if x.shape[dim] % parts:
        raise ValueError(f"sequence of {x.shape[dim]} tokens is not divisible by "
                         f"{'2*strategy.cp' if balance else 'strategy.cp'}={parts}")
    chunks = x.chunk(parts, dim)
    if not balance:
        return chunks[rank].contiguous()
    return torch.cat((chunks[rank], chunks[parts - 1 - rank]), dim)


def unshard_sequence(parts: list[torch.Tensor], dim: int, balance: bool) -> torch.Tensor:
    """The whole sequence from every cp rank's part, in rank order (the inverse of
    ``shard_sequence``)."""
    if not balance:
        return torch.cat(parts, dim)
    cp = len(parts)
    halves = [p.chunk(2, dim) for p in parts]
    return torch.cat([halves[r][0] for r in range(cp)] + [halves[r][1] for r in reversed(range(cp))], dim)


def local_positions(seq_len: int, cp: int, rank: int, balance: bool, device=None) -> torch.Tensor:
    """Global positions of this cp rank's ``seq_len / cp`` tokens."""
    return shard_sequence(torch.arange(seq_len, device=device), 0, cp, rank, balance)


def step_kind(rank: int, source: int, causal: bool, balance: bool) -> str:
    """Which part of the block that started on rank ``source`` this rank's queries see."""
    if not causal:
        return ALL
    if source == rank:
        return DIAG
    if balance:  # source's first chunk precedes both of mine, its second follows my first
        return EARLY_KEYS if source < rank else LATE_QUERIES
    return ALL if source < rank else SKIP


def block_work(rank: int, cp: int, causal: bool, balance: bool) -> float:
    """Score entries this rank computes over the ring, in units of one n x n block of its n
    local tokens (the diagonal block is computed whole, then masked): the per-rank load the
    zigzag split evens out. Causal: (C+1)/2 on every rank with the zigzag split, r+1 on rank r
    with the contiguous one (the same total)."""
    kinds = [step_kind(rank, (rank - i) % cp, causal, balance) for i in range(cp)]
    return sum({DIAG: 1.0, ALL: 1.0, LATE_QUERIES: 0.5, EARLY_KEYS: 0.5, SKIP: 0.0}[k] for k in kinds)


# ------------------------------------------------------------------ one block
def _acc(t: torch.Tensor) -> torch.dtype:
    """Accumulation dtype: fp32 for 16-bit inputs (as flash attention), else the input's own."""
    return torch.promote_types(t.dtype, torch.float32)


def _scores(q, k, scale, causal):
    """q [b, g, rep, nq, d] x k [b, g, nk, d] -> scores [b, g, rep, nq, nk] (at least fp32)."""
    acc = _acc(q)
    s = torch.einsum("bgrqd,bgkd->bgrqk", q.to(acc), k.to(acc)) * scale
    if causal:
        nq, nk = s.shape[-2], s.shape[-1]
        mask = torch.ones(nq, nk, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(mask, float("-inf"))
    return s


def _block_forward(q, k, v, scale, causal):
    """(output, log-sum-exp) of softmax attention of q over one block of k, v."""
    s = _scores(q, k, scale, causal)
    lse = s.logsumexp(-1)
    out = torch.einsum("bgrqk,bgkd->bgrqd", (s - lse.unsqueeze(-1)).exp(), v.to(s.dtype))
    return out, lse


def _block_backward(do, q, k, v, lse, delta, scale, causal):
    """dq, dk, dv of one block given the merged output's log-sum-exp and D = rowsum(dO * O)."""
    p = (_scores(q, k, scale, causal) - lse.unsqueeze(-1)).exp()
    dv = torch.einsum("bgrqk,bgrqd->bgkd", p, do)
    ds = p * (torch.einsum("bgrqd,bgkd->bgrqk", do, v.to(p.dtype)) - delta.unsqueeze(-1))
    dq = torch.einsum("bgrqk,bgkd->bgrqd", ds, k.to(p.dtype)) * scale
    dk = torch.einsum("bgrqk,bgrqd->bgkd", ds, q.to(p.dtype)) * scale
    return dq, dk, dv


def _merge(out, lse, o, l):
    """Fold a partial result (o, l) into the running (out, lse), in place."""
    new = torch.logaddexp(lse, l)
    out.mul_((lse - new).exp().unsqueeze(-1)).add_(o * (l - new).exp().unsqueeze(-1))
    lse.copy_(new)


def _halves(t, dim):
    n = t.shape[dim] // 2
    return t.narrow(dim, 0, n), t.narrow(dim, n, n)


def _parts(kind, q, kv):
    """(query slice, key/value block, causal) a ring step computes, or None."""
    if kind == SKIP:
        return None
    if kind == EARLY_KEYS:
        return slice(None), _halves(kv, 3)[0], False
    if kind == LATE_QUERIES:
        return slice(q.shape[3] // 2, None), kv, False
    return slice(None), kv, kind == DIAG


# ------------------------------------------------------------------ the ring
class _RingAttention(Function):
    """q [b, g, rep, n, d] (query heads grouped by their K/V head), k, v [b, g, n, d]."""

    @staticmethod
    def forward(ctx, q, k, v, group, causal, balance, scale, traffic):
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        ring = RingPass(group, traffic=traffic)
        kv = torch.stack((k, v)).contiguous()
        out = torch.zeros(q.shape, dtype=_acc(q), device=q.device)
        lse = torch.full(q.shape[:-1], float("-inf"), dtype=_acc(q), device=q.device)
        for i in range(cp):
            pending = ring.start(kv) if i < cp - 1 else None
            part = _parts(step_kind(rank, (rank - i) % cp, causal, balance), q, kv)
            if part is not None:
                rows, block, diag = part
                o, l = _block_forward(q[:, :, :, rows], block[0], block[1], scale, diag)
                _merge(out[:, :, :, rows], lse[:, :, :, rows], o, l)
            if pending is not None:
                kv = pending.wait()
        # Saved in the activation dtype, as flash attention does, and laid out [b, n, heads, d]
        # in memory (as SDPA's output is): the model's transpose to [b, n, heads * d] for the
        # output projection is then a view, so that projection's saved input is this tensor.
        result = out.permute(0, 3, 1, 2, 4).to(q.dtype).contiguous().permute(0, 2, 3, 1, 4)
        ctx.save_for_backward(q, k, v, result, lse)
        ctx.group, ctx.causal, ctx.balance, ctx.scale, ctx.traffic = group, causal, balance, scale, traffic
        return result

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        group, scale = ctx.group, ctx.scale
        cp, rank = dist.get_world_size(group), dist.get_rank(group)
        kv_ring, grad_ring = RingPass(group, 1, ctx.traffic), RingPass(group, 2, ctx.traffic)
        acc = lse.dtype
        do = dout.to(acc)
        delta = (do * out.to(acc)).sum(-1)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        kv = torch.stack((k, v)).contiguous()
        incoming = None  # the dK/dV accumulator of the block I hold, from the previous rank
        for i in range(cp):
            pending = kv_ring.start(kv) if i < cp - 1 else None
            dkv = torch.zeros((2, *k.shape), dtype=acc, device=k.device)
            part = _parts(step_kind(rank, (rank - i) % cp, ctx.causal, ctx.balance), q, kv)
            if part is not None:
                rows, block, diag = part
                dq_, dk_, dv_ = _block_backward(do[:, :, :, rows], q[:, :, :, rows], block[0], block[1],
                                                lse[:, :, :, rows], delta[:, :, :, rows], scale, diag)
                dq[:, :, :, rows] += dq_
                n = block.shape[3]
                dkv[0, :, :, :n] += dk_
                dkv[1, :, :, :n] += dv_
            if incoming is not None:
                dkv += incoming.wait()
            if cp == 1:
                break
            incoming = grad_ring.start(dkv)  # on to the block's next holder (its owner, at the end)
            if pending is not None:
                kv = pending.wait()
        dkv = incoming.wait() if cp > 1 else dkv
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group, *, causal: bool = True,
                   balance: bool = True, scale: float | None = None, traffic=None) -> torch.Tensor:
    """Softmax attention of this cp rank's queries over the whole sequence's keys and values.

    ``q`` [b, heads, n, d] and ``k``, ``v`` [b, kv_heads, n, d] (GQA: query head i uses K/V
    head i // (heads / kv_heads), as ``repeat_interleave`` lays them out) hold this rank's
    n = s/C tokens, split as ``shard_sequence(..., balance)`` splits them; returns [b, heads, n, d].
    ``traffic``: a ``tetrad.traffic.Traffic`` told every hop (None: not counted).
    """
    b, h, n, d = q.shape
    g = k.shape[1]
    if h % g:
        raise ValueError(f"ring attention: {h} query heads are not a multiple of {g} key/value heads")
    if causal and balance and n % 2:
        raise ValueError(f"ring attention with load balance needs an even number of local tokens (got {n})")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = _RingAttention.apply(q.reshape(b, g, h // g, n, d), k, v, group, causal, balance, scale, traffic)
    return out.reshape(b, h, n, d)


class RingAttention(Counted, nn.Module):
    """An attention core on [b, heads, n, d] replaced by ring attention over the cp group.

    ``inner`` is the unchanged core, kept (not called) so recomputation and the RNG checks
    still find it; the ring kernel keeps no s x s scores, so selective recomputation has
    nothing left to save here. ``kv_groups``: the query heads per K/V head (GQA) when the
    model hands the core K/V already repeated to every query head: the ring then sends only
    one copy of each (1/kv_groups of the bytes).
    """

    def __init__(self, inner: nn.Module | None, group, *, balance: bool, kv_groups: int = 1,
                 causal: bool = True):
        super().__init__()
        self.inner, self.group = inner, group
        self.balance, self.kv_groups, self.causal = balance, kv_groups, causal

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        rep = self.kv_groups
        if rep > 1 and k.shape[1] == q.shape[1] and q.shape[1] % rep == 0:
            k, v = k[:, ::rep], v[:, ::rep]  # the repeats are copies: send each head once
        return ring_attention(q, k, v, self.group, causal=self.causal, balance=self.balance, scale=scale,
                              traffic=self.traffic)
