"""``DataParallel``: the one interface the Engine drives, whatever the ZeRO stage.

Per step the Engine calls ``begin_backward(sync)`` before each micro-batch's backward (sync
on the last; then also ``prepare_step(lr)``), ``scale_loss`` on the loss, then ``finish()``,
``step(lr, clip, norm_groups)`` and ``zero_grad()``. It is assembled from three parts, each
complete when built (``build_data_parallel``): where parameters live between uses
(``ReplicatedParams`` for stages 0-2, ``ShardedParams`` for stage 3, each with its
``Publisher``), how gradients are synchronised (``FullGrads`` / ``ShardedGrads``), and the
``MasterStore`` that steps the optimizer (resident, or a tier's).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from tetrad.zero.flat import FlatGroup
from tetrad.zero.memory import memory_report
from tetrad.zero.scaler import DynamicLossScaler
from tetrad.zero.state import converting
from tetrad.zero.tier import MasterStore, Publisher


class DataParallel:
    def __init__(self, model: nn.Module, *, stage: int, params, grads, master: MasterStore,
                 publisher: Publisher, scaler: DynamicLossScaler | None, replica_rank: int = 0):
        self.model, self.stage = model, stage
        self.params, self.grads, self.master, self.publisher = params, grads, master, publisher
        self.scaler = scaler
        self.replica_rank = replica_rank  # hybrid sharding: which copy of the shards this rank holds

    @property
    def groups(self) -> list[FlatGroup]:
        return self.params.groups

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.master.optimizer

    # ------------------------------------------------------------------ per step
    def begin_backward(self, sync: bool) -> None:
        self.grads.begin_backward(sync)
        self.params.begin_backward(sync)

    def prepare_step(self, lr: float | None) -> None:
        """Before the synchronising backward: a store that steps buckets during backward
        (``strategy.offload.step: overlap``) takes its learning rate here."""
        self.master.prepare(lr, self.publisher)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.scaler is None else self.scaler.scale_loss(loss)

    def hold(self, params, backward: bool = False) -> None:
        """Keep ``params`` resident until ``release(params)``: the caller is about to run many
        passes over them in a row (a breadth-first pipeline's run of micro-batches through one
        chunk). Stage 3 gathers their units once for the span instead of once per pass;
        stages 0-2 always hold every parameter."""
        self.params.hold(params, backward)

    def release(self, params) -> None:
        """End a ``hold`` span: stage 3 frees the units."""
        self.params.release(params)

    def reduce_now(self, params) -> None:
        """``params`` get no more gradient this step: reduce (stages 2-3: reduce-scatter and
        free) the buckets or units made only of them now, not after the whole schedule."""
        self.grads.reduce_now(params)

    @property
    def gathered_units(self) -> int:
        """Stage-3 units all-gathered so far (0 at stages 0-2): a step's count is a difference."""
        return self.params.gathers

    def finish(self) -> None:
        self.grads.finish()
        self.params.finish()

    def step(self, lr: float | None, grad_clip: float = 0.0,
             norm_groups: dict | None = None) -> tuple[float, bool]:
        """Update the weights; returns (global grad norm before clipping, skipped)."""
        return self.master.step(lr, grad_clip, norm_groups, self.publisher)

    def zero_grad(self) -> None:
        self.grads.zero_grad()

    # ------------------------------------------------------------------ state and memory
    def memory_report(self) -> dict[str, int]:
        return memory_report(self.model, self.groups, self.optimizer)

    def buffer_bytes(self) -> int:
        """Idle pooled communication buffers (gathered units, flat gradients; see
        tetrad.zero.buffers): not model state, so not in ``memory_report``."""
        return sum(pool.idle_bytes for part in (self.params, self.grads)
                   for pool in (getattr(part, "storages", None), getattr(part, "buffers", None))
                   if pool is not None)

    def close(self) -> None:
        """Stop what the master store runs beside training (threads, I/O in flight)."""
        self.master.close()

    def state_pieces(self) -> list:
        """The store's pieces; under hybrid sharding the other replicas of a shard hold the
        same values, so only replica 0 marks them for writing (one writer per element)."""
        pieces = self.master.state_pieces()
        if self.replica_rank != 0:
            for piece in pieces:
                piece.write = False
        return pieces

    def load_state_pieces(self, fill: Callable) -> None:
        """``fill(pieces)`` (or an object with a ``fill`` method, e.g. a checkpoint reader)
        fills this rank's pieces; the compute parameters are then refreshed. Optimizer state
        saved in another dtype (``optimizer.state_dtype`` changed) is converted, with a warning."""
        self.master.load_state_pieces(converting(getattr(fill, "fill", fill)), self.publisher)
