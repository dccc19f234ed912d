"""Every pipeline schedule completes under NCCL's p2p rules, with the executor's own batching.

``tetrad.parallel.pipeline.nccl`` replays the batches the executor posts under NCCL's rules
(a group completes only when all its ops do; groups run in issue order per communicator;
FIFO matching without tags). The executor puts each (sender, receiver) stage pair on its own
communicator: every schedule tetrad builds then completes, p <= 8, m <= 16, each with its
chunk placement (ZB-V's V, whose turn on the last rank is a hand-over in memory; looped
breadth-first's round-robin over v chunks). On one shared communicator, as before, the looped
schedules (interleaved 1F1B, breadth-first) hang once micro-batches outnumber stages: the
check has teeth. A real gloo run records the p2p ops the executor issues and checks that the
simulator's model of them is exact.
"""

from __future__ import annotations

import pytest
import torch

from harness import run_distributed
from tetrad.parallel.pipeline.nccl import executor_batches, nccl_check
from tetrad.parallel.pipeline.schedule import LOOPED, SCHEDULES, build_schedule, placement


def _cases():
    for name in SCHEDULES:
        for p in range(2, 9):
            for m in range(1, 17):
                for v in ((2, 3, 4) if name in LOOPED else (1,)):
                    if name == "interleaved" and m % p:
                        continue  # the rule book refuses it (pipeline.interleaved_multiple)
                    yield name, p, m, v


def test_every_schedule_completes_under_nccl_rules():
    checked = set()
    for name, p, m, v in _cases():
        nccl_check(build_schedule(name, p, m, v), placement=placement(name, p, v))  # raises naming the stuck ranks
        checked.add(name)
    assert checked == set(SCHEDULES) and {"zero_bubble_v", "breadth_first"} <= checked


def test_one_shared_communicator_would_hang_looped_schedules():
    hangs = []
    for name, p, m, v in _cases():
        try:
            nccl_check(build_schedule(name, p, m, v), channels="one", placement=placement(name, p, v))
        except RuntimeError:
            hangs.append((name, p, m, v))
    assert hangs and all(name in LOOPED and m > p for name, p, m, v in hangs)
    assert ("interleaved", 2, 4, 2) in hangs  # the audit's example (B3)
    assert ("breadth_first", 2, 4, 2) in hangs


RECORDED = [("interleaved", 2), ("zero_bubble_v", 1), ("breadth_first", 2)]  # (schedule, v) at p=2, m=4


def _record(rank: int, world: int) -> list:
    """Run each of RECORDED at p=2, m=4 on gloo and record every p2p op this rank posts."""
    return [_record_one(rank, name, v) for name, v in RECORDED]


def _record_one(rank: int, name: str, v: int) -> list:
    import torch.distributed as dist
    from torch import nn

    from tetrad.parallel.pipeline import build_pipeline
    from tetrad.parallel.pipeline.p2p import StageComm

    seen = []
    real = dist.batch_isend_irecv

    def spy(ops):
        for op in ops:
            kind, chunk, mb = op.tag & 1, (op.tag >> 1) & 0x7FF, op.tag >> 12
            seen.append(("send" if op.op is dist.isend else "recv", dist.get_group_rank(dist.group.WORLD, op.peer), kind, chunk, mb))
        return real(ops)

    dist.batch_isend_irecv = spy
    try:
        layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(4)])
        model = nn.Module()
        model.layers = layers
        model.forward = lambda x: x
        place = placement(name, 2, v)
        chunks = [_Chunk(layers[g], first=(g == 0), last=(g == 3))
                  for g in (place.global_of(rank, j) for j in range(2))]
        ex = build_pipeline(model, dist.group.WORLD, schedule=name, virtual_stages=v,
                            act_shape=(1, 2, 4), dtype=torch.float32, device=torch.device("cpu"),
                            loss_fn=lambda out, y: out.square().mean(), chunks=chunks)
        ex.run([torch.ones(1, 2, 4)] * 4, [None] * 4)
    finally:
        dist.batch_isend_irecv = real
    return seen


class _Chunk(torch.nn.Module):
    def __init__(self, layer, first: bool, last: bool):
        super().__init__()
        self.layer, self.is_first, self.is_last = layer, first, last
        self.layers = [layer]

    def forward(self, x):
        return self.layer(x)


@pytest.mark.slow
def test_the_simulator_models_the_executors_real_ops():
    recorded = run_distributed(_record, 2)
    for i, (name, v) in enumerate(RECORDED):
        schedule = build_schedule(name, 2, 4, v)
        for rank in range(2):
            model = [("send" if op.send else "recv", op.peer, op.kind, op.chunk, op.mb)
                     for b in executor_batches(schedule[rank], rank, 2, 4, "by_pair", placement(name, 2, v))
                     for op in b.ops]
            assert recorded[rank][i] == model and model, (name, rank)
