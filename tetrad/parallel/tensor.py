"""Tensor-parallel layers (Megatron-LM style) built from the plain model's own layers.

Each parallel layer is made *from* an existing ``nn.Linear`` / ``nn.Embedding`` (or Hugging
Face's transposed ``Conv1D``) by slicing its weight, so a tensor-parallel model starts from
exactly the single-process model's initial values, and keeps its parameter names (``weight``,
``bias``), which checkpoints key on.

Every sharded parameter carries one typed attribute, ``p.tp_shard`` (a
``tetrad.checkpoint.pieces.TPShard``: its box of the logical tensor, and for a fused
projection whose shard is several boxes, GPT-2's ``c_attn`` q|k|v, the view that makes it
one), read through ``tp_shard(p)``. Replicated parameters have none. ZeRO's grad norm counts
a sharded parameter once per tp rank and a replicated one once overall; checkpoints save
each shard as its box. Every layer here is ``Counted``: its collectives, forward and backward,
are told to the layout's byte counter (``tetrad.parallel.comm.count_into``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tetrad.checkpoint.pieces import TPShard
from tetrad.parallel.comm import (Counted, all_gather_tensor, copy_to_region, gather_from_region,
                                  gather_from_sequence, reduce_from_region, reduce_scatter_to_sequence,
                                  scatter_to_region)
from tetrad.traffic import count as count_traffic

# How a column-parallel layer receives its input: "copy" (replicated input; backward
# all-reduces), "gather" (Megatron-SP: all-gather the sequence first) or "none" (a
# module-level hook already did one of those once for several projections).
INPUT_MODES = ("copy", "gather", "none")


def mark_tp(p: nn.Parameter, offsets: tuple[int, ...], global_shape: tuple[int, ...],
            view: tuple[int, ...] | None = None) -> nn.Parameter:
    p.tp_shard = TPShard(tuple(int(d) for d in offsets), tuple(int(d) for d in global_shape),
                         None if view is None else tuple(int(d) for d in view))
    return p


def _shard(t: torch.Tensor, dim: int, rank: int, world: int, parts: int = 1) -> torch.Tensor:
    """My slice of `dim`; with parts > 1, my slice of each of `parts` equal blocks, concatenated."""
    blocks = t.chunk(parts, dim)
    return torch.cat([b.chunk(world, dim)[rank] for b in blocks], dim).detach().clone()


def _box(t: torch.Tensor, dim: int, rank: int, world: int, parts: int):
    """(offsets, global_shape, view) of a `_shard` of `t`, in the view that makes it one box."""
    shape = list(t.shape)
    if parts == 1:
        offsets = [0] * len(shape)
        offsets[dim] = rank * shape[dim] // world
        return offsets, shape, None
    # [.., parts * n, ..] viewed as [.., parts, n, ..]: the shard is one box of that view.
    g = shape[:dim] + [parts, shape[dim] // parts] + shape[dim + 1:]
    offsets = [0] * len(g)
    offsets[dim + 1] = rank * g[dim + 1] // world
    local = list(g)
    local[dim + 1] //= world
    return offsets, g, local


def enter_region(x: torch.Tensor, mode: str, group, traffic=None) -> torch.Tensor:
    """Bring a replicated ("copy") or sequence-sharded ("gather") input into a tp region.

    A gathered tensor remembers its shard (``.sequence_shard``) so the projections that use it
    can save the shard, not the whole sequence, for backward (see `_ShardSavingLinear`).
    """
    if mode == "copy":
        return copy_to_region(x, group, traffic)
    if mode == "gather":
        full = gather_from_sequence(x, group, traffic=traffic)
        if full is not x:
            full.sequence_shard = x
        return full
    return x


class _ShardSavingLinear(torch.autograd.Function):
    """y = linear(x_full) that saves only this rank's sequence shard of x_full and all-gathers
    it again in backward (Megatron-SP). Saving x_full would keep the full-sequence activation
    that sequence parallelism exists to shard: Korthikanti et al. count the linear inputs in
    the 10sbh term that SP divides by t. The gradient of x_full is returned whole; the gather
    that made x_full reduce-scatters it."""

    @staticmethod
    def forward(ctx, full, shard, weight, bias, group, transposed, traffic):
        ctx.group, ctx.transposed, ctx.has_bias, ctx.traffic = group, transposed, bias is not None, traffic
        ctx.save_for_backward(shard, weight)
        return F.linear(full, weight.t() if transposed else weight, bias)

    @staticmethod
    def backward(ctx, gy):
        shard, weight = ctx.saved_tensors
        w = weight.t() if ctx.transposed else weight  # [out, in]
        full = all_gather_tensor(shard, 1, ctx.group, ctx.traffic)
        g2 = gy.reshape(-1, gy.shape[-1])
        gw = g2.t().matmul(full.reshape(-1, full.shape[-1]))
        gb = g2.sum(0) if ctx.has_bias else None
        return gy.matmul(w), None, gw.t() if ctx.transposed else gw, gb, None, None, None


def column_linear(x, weight, bias, mode: str, group, transposed: bool = False, traffic=None) -> torch.Tensor:
    """The column-parallel product for any input mode, saving a shard where there is one."""
    x = enter_region(x, mode, group, traffic)
    shard = getattr(x, "sequence_shard", None)
    if shard is not None:
        return _ShardSavingLinear.apply(x, shard, weight, bias, group, transposed, traffic)
    return F.linear(x, weight.t() if transposed else weight, bias)


class ColumnParallelLinear(Counted, nn.Module):
    """y_r = x A_r: the output features split over ranks; the output stays split.

    `transposed` is for HF ``Conv1D`` (weight stored [in, out]); `parts` for fused projections
    whose output is `parts` equal blocks (q|k|v) that must each be split, not the whole.
    `gather_output` all-gathers the split output (transformers' ``colwise_gather_output``:
    a fused projection whose consumer needs every feature, e.g. Phi-3's q|k|v of unequal sizes).
    """

    def __init__(self, layer: nn.Module, group, input_mode: str = "copy", *,
                 transposed: bool = False, parts: int = 1, gather_output: bool = False):
        super().__init__()
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode={input_mode!r}; expected one of {INPUT_MODES}")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.group, self.input_mode, self.transposed = group, input_mode, transposed
        self.gather_output = gather_output
        out_dim = 1 if transposed else 0
        w = layer.weight
        if w.shape[out_dim] % (world * parts):
            raise ValueError(f"output features {w.shape[out_dim]} not divisible by tp*parts={world}*{parts}")
        self.weight = mark_tp(nn.Parameter(_shard(w, out_dim, rank, world, parts)),
                              *_box(w, out_dim, rank, world, parts))
        b = getattr(layer, "bias", None)
        self.bias = None if b is None else mark_tp(nn.Parameter(_shard(b, 0, rank, world, parts)),
                                                   *_box(b, 0, rank, world, parts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = column_linear(x, self.weight, self.bias, self.input_mode, self.group, self.transposed, self.traffic)
        return gather_from_region(y, self.group, traffic=self.traffic) if self.gather_output else y


class RowParallelLinear(Counted, nn.Module):
    """y = sum_r x_r A_r: input features split over ranks, partial outputs summed.

    With `sequence` (Megatron-SP) the sum is a reduce-scatter that leaves each rank its slice of
    the sequence. The bias is replicated and added once, after the sum; under Megatron-SP it
    sees only this rank's tokens, so it enters through copy_to_region to get the full gradient.
    `split_input` takes this rank's slice of a replicated input first (transformers'
    ``rowwise_split_input``, after a ``colwise_gather_output``).
    """

    def __init__(self, layer: nn.Module, group, sequence: bool = False, *, transposed: bool = False,
                 split_input: bool = False):
        super().__init__()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.group, self.sequence, self.transposed = group, sequence, transposed
        self.split_input = split_input
        in_dim = 0 if transposed else 1
        w = layer.weight
        if w.shape[in_dim] % world:
            raise ValueError(f"input features {w.shape[in_dim]} not divisible by tp={world}")
        self.weight = mark_tp(nn.Parameter(_shard(w, in_dim, rank, world)), *_box(w, in_dim, rank, world, 1))
        b = getattr(layer, "bias", None)
        self.bias = None if b is None else nn.Parameter(b.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.t() if self.transposed else self.weight
        if self.split_input:
            x = scatter_to_region(x, self.group, traffic=self.traffic)
        y = F.linear(x, w)
        if self.sequence:
            y = reduce_scatter_to_sequence(y, self.group, traffic=self.traffic)
            return y if self.bias is None else y + copy_to_region(self.bias, self.group, self.traffic)
        y = reduce_from_region(y, self.group, self.traffic)
        return y if self.bias is None else y + self.bias


def vocab_range(vocab: int, rank: int, world: int) -> tuple[int, int, int]:
    """(start, end, per_rank): rows of the real vocabulary this rank holds.

    The vocabulary is padded to `per_rank * world` (a multiple of tp) so every rank's logits
    have the same width; the padding exists only as -inf logits, never as parameters, so
    checkpoints hold exactly the single-process shapes.
    """
    per = math.ceil(vocab / world)
    start = min(rank * per, vocab)
    end = min(start + per, vocab)
    if start == end:
        raise ValueError(f"vocab_size={vocab} is too small for tp={world}: rank {rank} would hold "
                         f"no rows; use tp <= {max(1, vocab // per)}")
    return start, end, per


class VocabParallelEmbedding(Counted, nn.Module):
    """Each rank holds a contiguous range of vocabulary rows; lookups outside it give zeros and
    the all-reduce (or Megatron-SP reduce-scatter) fills them in from the owner.

    An embedding that scales its output (Hugging Face's ``embed_scale`` buffer, Gemma's
    sqrt(hidden)) keeps its scale.
    """

    def __init__(self, emb: nn.Embedding, group, sequence: bool = False):
        super().__init__()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.group, self.sequence = group, sequence
        vocab = emb.weight.shape[0]
        self.start, self.end, _ = vocab_range(vocab, rank, world)
        self.weight = mark_tp(nn.Parameter(emb.weight[self.start:self.end].detach().clone()),
                              (self.start, 0), tuple(emb.weight.shape))
        pad = getattr(emb, "padding_idx", None)
        self.padding_idx = pad - self.start if pad is not None and self.start <= pad < self.end else None
        scale = getattr(emb, "embed_scale", None)
        self.register_buffer("embed_scale", scale if torch.is_tensor(scale) else None, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight, self.padding_idx).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.embed_scale is not None:
            out = out * self.embed_scale.to(out.dtype)
        if self.sequence:
            return reduce_scatter_to_sequence(out, self.group, traffic=self.traffic)
        return reduce_from_region(out, self.group, self.traffic)


class VocabParallelHead(Counted, nn.Module):
    """Output projection onto this rank's vocabulary rows; logits stay split over ranks.

    The output is padded with -inf columns to the padded shard width, so the padding tokens get
    zero probability and zero gradient: they are never predicted.
    """

    def __init__(self, layer: nn.Linear, group, input_mode: str = "copy", *,
                 tied: nn.Parameter | None = None):
        super().__init__()
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.group, self.input_mode = group, input_mode
        vocab = layer.weight.shape[0]
        start, end, self.per_rank = vocab_range(vocab, rank, world)
        self.weight = tied if tied is not None else mark_tp(
            nn.Parameter(layer.weight[start:end].detach().clone()), (start, 0), tuple(layer.weight.shape))
        b = getattr(layer, "bias", None)
        self.bias = None if b is None else mark_tp(nn.Parameter(b[start:end].detach().clone()),
                                                   (start,), tuple(b.shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = column_linear(x, self.weight, self.bias, self.input_mode, self.group, traffic=self.traffic)
        missing = self.per_rank - logits.shape[-1]
        return F.pad(logits, (0, missing), value=float("-inf")) if missing else logits


class _VocabParallelCE(torch.autograd.Function):
    """Cross-entropy over logits split along the vocabulary: three all-reduces of [tokens]
    vectors (max, sum of exp, target logit) instead of gathering [tokens, vocab] logits."""

    @staticmethod
    def forward(ctx, logits, labels, group, ignore_index, reduction, traffic):
        width = logits.shape[-1]
        start = dist.get_rank(group) * width
        gmax = logits.max(dim=-1).values
        count_traffic(traffic, "all_reduce", group, gmax.numel() * gmax.element_size())
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - gmax.unsqueeze(-1)
        valid = labels != ignore_index
        target = labels - start
        mine = valid & (target >= 0) & (target < width)
        target = target.clamp(0, width - 1).masked_fill(~mine, 0)
        picked = shifted.gather(-1, target.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        both = torch.stack((picked, sum_exp))
        count_traffic(traffic, "all_reduce", group, both.numel() * both.element_size())
        dist.all_reduce(both, group=group)
        picked, sum_exp = both.unbind(0)
        count = valid.sum() if reduction == "mean" else torch.ones((), dtype=torch.int64, device=valid.device)
        loss = ((sum_exp.log() - picked) * valid).sum() / count
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), target, mine, valid, count)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, target, mine, valid, count = ctx.saved_tensors
        g = softmax  # reused in place: backward runs once
        g.scatter_add_(-1, target.unsqueeze(-1), -mine.to(g.dtype).unsqueeze(-1))
        g.mul_((valid.to(g.dtype) * (grad / count)).unsqueeze(-1))
        return g, None, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group,
                                 ignore_index: int = -100, reduction: str = "mean",
                                 traffic=None) -> torch.Tensor:
    """Next-token cross-entropy over labels != ignore_index from vocab-split logits: their mean,
    or with ``reduction="sum"`` their sum (the engine divides by the global batch's count).

    `logits` [..., V/tp] are this rank's equal-width slice (rank r holds token ids
    r*width .. (r+1)*width - 1); computed in at least fp32, like the single-process loss.
    Every rank of `group` returns the same full loss. ``traffic`` counts its two all-reduces.
    """
    flat = logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, logits.shape[-1])
    if dist.get_world_size(group) == 1:
        return F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    return _VocabParallelCE.apply(flat, labels.reshape(-1).to(flat.device), group, ignore_index, reduction,
                                  traffic)
