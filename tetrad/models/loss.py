"""Language-model loss shared by every model and by the reference runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Mean (or with ``reduction="sum"``, summed) next-token cross-entropy over labels != -100.

    `labels` are already aligned with `logits` (labels[:, t] is the target for position t):
    no shifting happens here. Logits are upcast to fp32 because a bf16 log-softmax over a
    large vocabulary loses enough precision to move the loss curve.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)
