"""Flat gradient buckets: parameters grouped, in backward order, into contiguous buffers.

Why our own rather than torch DDP's reducer: the same buckets serve plain data parallelism
(all-reduce) and ZeRO stage 2 (reduce-scatter of each bucket into the owner's shard), and
they must take explicit process groups on a multi-axis mesh. Each ``param.grad`` is a view
into its bucket, so autograd accumulates straight into the buffer that is communicated:
no copy before the collective, none after.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Bucket:
    """One flat buffer and the parameters whose gradients live in it."""

    params: list[nn.Parameter]
    offsets: list[int]
    buffer: torch.Tensor
    pending: int = 0
    handle: object | None = None
    extra: dict = field(default_factory=dict)

    def view(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return self.buffer[self.offsets[i]:self.offsets[i] + p.numel()].view_as(p)


def split_into_buckets(params: list[nn.Parameter], bucket_bytes: int, pad_to: int = 1,
                       dtype: torch.dtype | None = None) -> list[Bucket]:
    """Group ``params`` in reverse order (the order backward produces their gradients).

    A bucket closes once it holds at least ``bucket_bytes``; each buffer's length is padded
    to a multiple of ``pad_to`` so it can be split evenly across ``pad_to`` ranks.
    """
    buckets, current, size = [], [], 0
    for p in reversed(params):
        current.append(p)
        size += p.numel() * p.element_size()
        if size >= bucket_bytes:
            buckets.append(_make_bucket(current, pad_to, dtype))
            current, size = [], 0
    if current:
        buckets.append(_make_bucket(current, pad_to, dtype))
    return buckets


def _make_bucket(params: list[nn.Parameter], pad_to: int, dtype: torch.dtype | None) -> Bucket:
    offsets, n = [], 0
    for p in params:
        offsets.append(n)
        n += p.numel()
    n = -(-n // pad_to) * pad_to
    first = params[0]
    buffer = torch.zeros(n, dtype=dtype or first.dtype, device=first.device)
    return Bucket(list(params), offsets, buffer)


def attach_grads(buckets: list[Bucket]) -> None:
    """Point every parameter's ``.grad`` at its slice of the bucket buffer (after set_to_none)."""
    for bucket in buckets:
        for i, p in enumerate(bucket.params):
            if p.grad is None or p.grad.data_ptr() != bucket.view(i).data_ptr():
                view = bucket.view(i)
                if p.grad is not None:
                    view.copy_(p.grad)
                p.grad = view
