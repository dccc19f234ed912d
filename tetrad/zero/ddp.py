"""Plain data parallelism (``zero: 0``): bucketed gradient all-reduce overlapped with backward.

Each bucket's all-reduce is launched (asynchronously) from the post-accumulate-grad hook of
the last of its parameters to receive a gradient, so communication of late layers runs while
autograd is still computing gradients of early layers. With gradient accumulation only the
last micro-batch communicates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from tetrad.zero.buckets import Bucket, attach_grads, split_into_buckets


class AllReduceGrads:
    """Averages gradients over ``group`` bucket by bucket as backward produces them."""

    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup | None,
                 bucket_bytes: int):
        self.params = [p for p in params if p.requires_grad]
        self.group = group
        self.world = dist.get_world_size(group) if group is not None else 1
        self.buckets = split_into_buckets(self.params, bucket_bytes)
        self._sync = False
        self._where = {}
        for bucket in self.buckets:
            for p in bucket.params:
                self._where[p] = bucket
                p.register_post_accumulate_grad_hook(self._on_grad)
        attach_grads(self.buckets)

    def begin_backward(self, sync: bool) -> None:
        """Call before each micro-batch's backward; ``sync`` on the last one of a step."""
        attach_grads(self.buckets)
        self._sync = sync and self.world > 1
        if self._sync:
            for bucket in self.buckets:
                bucket.pending, bucket.handle = len(bucket.params), None

    def _on_grad(self, p: nn.Parameter) -> None:
        if not self._sync:
            return
        bucket = self._where[p]
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch(bucket)

    def _launch(self, bucket: Bucket) -> None:
        # Divide first: the sum of N pre-scaled gradients cannot overflow in low precision.
        bucket.buffer.div_(self.world)
        bucket.handle = dist.all_reduce(bucket.buffer, group=self.group, async_op=True)

    def finish(self) -> None:
        """Wait for every bucket; buckets of parameters that got no gradient are reduced now."""
        if not self._sync:
            return
        for bucket in self.buckets:
            if bucket.handle is None:
                self._launch(bucket)
        for bucket in self.buckets:
            bucket.handle.wait()
            bucket.handle = None
        self._sync = False

    def zero_grad(self) -> None:
        for bucket in self.buckets:
            bucket.buffer.zero_()

    def grad_bytes(self) -> int:
        return sum(b.buffer.numel() * b.buffer.element_size() for b in self.buckets)
