"""How one optimizer step runs its micro-batches: one runner per step mode.

``MicroBatchRunner`` (pp = 1) runs each micro-batch's forward, loss and backward in turn
through the engine's own micro-batch API, so ``train_step`` and a user's loop of
``engine(x); engine.backward(loss); engine.step()`` share every line. ``PipelineRunner``
(pp > 1) hands all micro-batches to the schedule's executor, with gradients accumulating
locally until the schedule is done, then synchronises and steps once; the data-parallel
engine is the executor's residency (``ChunkResidency``), so a breadth-first schedule's runs
of passes through one chunk hold that chunk's ZeRO-3 units gathered for the run and reduce
its gradients after its last backward. Both return this rank's summed loss (fp64), which
the engine averages over the gradient group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class MicroBatchRunner:
    def __init__(self, engine):
        self.engine = engine

    def run(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        e, n = self.engine, len(micro)
        total = torch.zeros((), dtype=torch.float64, device=e.device)
        for x, y in micro:
            x, y = e.shard_micro_batch(x, y)
            loss = e.loss(e(x), y)
            e.backward(loss, accum_steps=n)
            total += loss.detach().double()
            e.step(accum_steps=n)
        return total


class ChunkResidency:
    """What the pipeline executor tells about a chunk's run of passes, passed on to the
    data-parallel engine: the run holds the chunk's parameters (ZeRO-3: gathered once), and
    after the chunk's last backward of the step its gradients are reduced at once -- except
    tied weights', which the first and last stage sum only after the schedule."""

    def __init__(self, dp, ties):
        self.dp = dp
        self.late = {id(p) for p in (ties.params if ties is not None else ())}

    def hold(self, params, backward: bool = False) -> None:
        self.dp.hold(params, backward)

    def release(self, params, done: bool = False) -> None:
        self.dp.release(params)
        if done:
            self.dp.reduce_now([p for p in params if id(p) not in self.late])


class PipelineRunner:
    """``executor``: the schedule's ``PipelineExecutor`` over this rank's chunks."""

    def __init__(self, engine, executor, d_model: int):
        self.engine, self.executor, self.d_model = engine, executor, d_model

    def run(self, micro: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The schedule over all micro-batches, one gradient sync, one step; the summed loss is
        broadcast from the last stage to the pp group."""
        e, dp = self.engine, self.engine.data_parallel
        micro = [e.shard_micro_batch(x, y) for x, y in micro]
        x0 = micro[0][0]
        shards = e.layout.tp if e.layout.megatron_sp_active else 1  # sequence split over tp
        shape = (x0.shape[0], x0.shape[1] // shards, self.d_model)
        dp.begin_backward(sync=False)
        gathered = dp.gathered_units
        total = self.executor.run([x for x, _ in micro], [y for _, y in micro], act_shape=shape,
                                  scale=lambda loss: dp.scale_loss(loss / len(micro)),
                                  residency=ChunkResidency(dp, e.ties))
        if e.ties is not None:  # tied embeddings: first and last stage sum their gradients
            e.ties.sync()
        dp.begin_backward(sync=True)  # no backward follows: finish() reduces every bucket
        e.optimizer_step()
        pp_group = e.layout.group("pp")
        src = dist.get_global_rank(pp_group, self.executor.last_rank)
        e.layout.nodes.traffic.broadcast(pp_group, total.numel() * total.element_size(), src)
        dist.broadcast(total, group=pp_group, src=src)
        e.last.update({f"pipeline_{k}": v for k, v in self.executor.stats.items()})
        e.last["pipeline_zero3_gathers"] = dp.gathered_units - gathered  # units, this rank, this step
        return total
