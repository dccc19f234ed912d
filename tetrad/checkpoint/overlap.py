"""Copy the elements two (box, flat range) holdings of one logical tensor have in common.

This one function is what makes reshard-on-load layout independent: a saved piece and a
requested piece are both "flat range [start, start+numel) of the row-major box at offsets
with shape", whatever layout (tp split, ZeRO flat shard, replica) produced them. The two
common cases take fast paths (whole boxes: a strided slice copy; the same box: a 1-D range
copy); anything else falls back to index arithmetic over the boxes' intersection, a chunk
of rows at a time so the index tensors stay small.

Two holdings whose boxes are in different *frames* (reshapes of the logical tensor, see
``Piece.frame``) are matched by global flat index instead: row-major order is the same in
every frame, so an element's flat index in the logical tensor identifies it in both.
"""

from __future__ import annotations

import math

import torch

from tetrad.checkpoint.pieces import Piece

_INDEX_CHUNK = 1 << 22  # elements of the intersection handled per index-arithmetic pass


def _is_whole_box(offsets, shape, flat_start, numel) -> bool:
    return flat_start == 0 and numel == math.prod(shape)


def _strides(shape) -> list[int]:
    out, acc = [], 1
    for d in reversed(shape):
        out.append(acc)
        acc *= d
    return out[::-1]


def copy_overlap(dst: Piece, covered: torch.Tensor, src: torch.Tensor, meta: dict) -> int:
    """Copy into ``dst.tensor`` what flat ``src`` (saved with ``meta``'s box and range) covers.

    ``covered`` is a bool mask over dst's elements, set where something was copied. Returns
    the number of elements copied.
    """
    s_off, s_shape = tuple(meta["box_offsets"]), tuple(meta["box_shape"])
    s_start, s_numel = int(meta["flat_start"]), int(meta["numel"])
    lo = [max(a, b) for a, b in zip(s_off, dst.box_offsets)]
    hi = [min(a + n, b + m) for a, n, b, m in zip(s_off, s_shape, dst.box_offsets, dst.box_shape)]
    if any(h <= l for l, h in zip(lo, hi)):
        return 0
    dst_flat = dst.tensor.view(-1)
    if _is_whole_box(s_off, s_shape, s_start, s_numel) and \
            _is_whole_box(dst.box_offsets, dst.box_shape, dst.flat_start, dst.numel):
        d_sl = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, dst.box_offsets))
        s_sl = tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, s_off))
        dst_flat.view(dst.box_shape)[d_sl] = src.view(s_shape)[s_sl]
        covered.view(dst.box_shape)[d_sl] = True
        return math.prod(h - l for l, h in zip(lo, hi))
    if s_off == dst.box_offsets and s_shape == dst.box_shape:
        a, b = max(s_start, dst.flat_start), min(s_start + s_numel, dst.flat_start + dst.numel)
        if b <= a:
            return 0
        dst_flat[a - dst.flat_start:b - dst.flat_start] = src[a - s_start:b - s_start]
        covered[a - dst.flat_start:b - dst.flat_start] = True
        return b - a
    return _copy_by_index(dst_flat, covered, src, (s_off, s_shape, s_start, s_numel),
                          (dst.box_offsets, dst.box_shape, dst.flat_start, dst.numel), lo, hi)


def _box_flat_index(lo, hi, first: tuple[int, int], off, shape) -> torch.Tensor:
    """Row-major flat index within box (off, shape) of each element of the intersection rows
    [first[0], first[1]) x lo[1:]..hi[1:], as a 1-D int64 tensor."""
    idx = torch.zeros((), dtype=torch.int64)
    ranges = [(first[0], first[1])] + list(zip(lo[1:], hi[1:]))
    for d, ((a, b), o, st) in enumerate(zip(ranges, off, _strides(shape))):
        coords = (torch.arange(a, b, dtype=torch.int64) - o) * st
        idx = idx.unsqueeze(-1) + coords.view(*([1] * d), -1) if d else coords
    return idx.reshape(-1)


def _copy_by_index(dst_flat, covered, src, s_desc, d_desc, lo, hi) -> int:
    if not lo:  # 0-d tensors are always whole boxes, handled above
        raise AssertionError("0-d piece reached the general path")
    row = math.prod(h - l for l, h in zip(lo[1:], hi[1:]))
    rows_per_chunk = max(1, _INDEX_CHUNK // max(1, row))
    copied = 0
    for r0 in range(lo[0], hi[0], rows_per_chunk):
        rows = (r0, min(hi[0], r0 + rows_per_chunk))
        s_idx = _box_flat_index(lo, hi, rows, s_desc[0], s_desc[1]) - s_desc[2]
        d_idx = _box_flat_index(lo, hi, rows, d_desc[0], d_desc[1]) - d_desc[2]
        keep = (s_idx >= 0) & (s_idx < s_desc[3]) & (d_idx >= 0) & (d_idx < d_desc[3])
        s_idx, d_idx = s_idx[keep], d_idx[keep]
        dst_flat[d_idx] = src[s_idx]
        covered[d_idx] = True
        copied += int(d_idx.numel())
    return copied



def _global_flat(offsets, shape, flat_start: int, numel: int, frame) -> torch.Tensor:
    """Flat indices in the logical tensor of a holding's elements, in its storage order."""
    if not shape:
        return torch.zeros(numel, dtype=torch.int64)
    lo = list(offsets)
    hi = [o + n for o, n in zip(offsets, shape)]
    idx = _box_flat_index(lo, hi, (lo[0], hi[0]), [0] * len(frame), frame)
    return idx[flat_start:flat_start + numel]


def _local_index(g: torch.Tensor, frame, offsets, shape, flat_start: int, numel: int) -> torch.Tensor:
    """For global flat indices ``g``: the position in a holding (box in ``frame``, flat range)
    of each, or -1 where the holding does not have that element."""
    local = torch.zeros_like(g)
    inside = torch.ones_like(g, dtype=torch.bool)
    rest = g
    for d in range(len(frame) - 1, -1, -1):  # unravel, last dim first
        coord = rest % frame[d] - offsets[d]
        rest = rest // frame[d]
        inside &= (coord >= 0) & (coord < shape[d])
        local += coord * math.prod(shape[d + 1:])
    local -= flat_start
    inside &= (local >= 0) & (local < numel)
    return torch.where(inside, local, -1)


def copy_across_frames(dst: Piece, covered: torch.Tensor, src: torch.Tensor, meta: dict,
                       global_shape) -> int:
    """``copy_overlap`` for a saved piece whose box is in another frame than ``dst``'s: each
    saved element's flat index in the logical tensor is unravelled in dst's frame."""
    s_frame = tuple(meta.get("frame") or global_shape)
    g_src = _global_flat(meta["box_offsets"], meta["box_shape"], int(meta["flat_start"]),
                         int(meta["numel"]), s_frame)
    if not dst.box_shape:  # 0-d: frames cannot differ
        raise AssertionError("0-d piece with a frame")
    d_idx = _local_index(g_src, dst.box_frame, dst.box_offsets, dst.box_shape, dst.flat_start, dst.numel)
    hit = d_idx >= 0
    d_idx = d_idx[hit]
    dst.tensor.view(-1)[d_idx] = src[hit]
    covered[d_idx] = True
    return int(d_idx.numel())
