"""Tied input/output embeddings across pipeline stages (Megatron-LM's embedding group).

The first stage looks tokens up in the embedding, the last projects onto the vocabulary with
the same matrix. Each holds the weight (the last as a *stage replica*, under the embedding's
name, initialised to the same values); after every step's schedule the two gradients are
summed over the pair of ranks, so both hold the gradient of the one tied weight and their
optimizers take the same step. The replica is left out of the gradient norm and of
checkpoints (``tetrad.checkpoint.pieces.mark_stage_replica``), so the model is one tensor
there, as it is with one stage.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from tetrad.checkpoint.pieces import mark_stage_replica
from tetrad.traffic import count


class TiedWeights:
    """The tied parameters this stage shares with the other end of the pipeline, and the
    process group of the two ranks (first stage, last stage) that hold them, and the byte
    counter the gradient sums are told to (``traffic``, a ``tetrad.traffic.Traffic`` or None)."""

    def __init__(self, params: list[nn.Parameter], group, traffic=None):
        self.params, self.group, self.traffic = params, group, traffic

    @classmethod
    def build(cls, model: nn.Module, ties: list[str], replicas: list[str], group,
              traffic=None) -> "TiedWeights | None":
        """``ties``: names this stage shares (``split.stage_ties``), ``replicas``: those it only
        copies (``split.stage_replicas``); None when this stage shares nothing."""
        if not ties:
            return None
        named = dict(model.named_parameters())
        for name in replicas:
            mark_stage_replica(named[name])
        return cls([named[name] for name in ties], group, traffic)

    @torch.no_grad()
    def sync(self) -> None:
        """Sum the tied weights' gradients over the two stages (call before ZeRO reduces)."""
        for p in self.params:
            if p.grad is None:  # a stage whose micro-batches never reached it: zero, not absent
                p.grad = torch.zeros_like(p)
            count(self.traffic, "all_reduce", self.group, p.grad.numel() * p.grad.element_size())
            dist.all_reduce(p.grad, group=self.group)
