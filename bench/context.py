"""Context parallelism (ring attention) at world 4: activation memory per rank against the
formula, the causal load imbalance with and without the zigzag split, and tokens/s beside
Ulysses sp and plain dp in the same run.

    torchrun --nproc_per_node 4 bench/context.py [--seq-len 1024 --d-model 128 --steps 5 --reps 5]

Prints one JSON line per result (rank 0).

* ``memory``: the bytes one block's autograd graph keeps alive on a rank
  (``tetrad.recompute.measure.graph_bytes``) for a Llama-style block under each layout, with
  Korthikanti et al.'s formula on the rank's own tokens beside it: sbh(10 + 24/t), or 34sbh/t
  with Megatron-SP, at fp32 (x2), s = seq_len / (cp * sp); no s x s term, since neither the
  CPU flash kernel (cp 1) nor the ring's blocks keep scores.
* ``imbalance``: per rank, the CPU seconds (``thread_time``: torch runs one thread per rank,
  so a rank descheduled while others use the shared cores is not charged) spent inside ring
  attention's block kernels (forward and backward, the work the split decides) per call, over
  ``--reps`` calls on [1, 8, s/cp, 16]
  tensors; ``max_over_mean`` across ranks, and the whole call's time (every rank waits for
  the slowest at each ring step). ``predicted`` is ``block_work``'s max/mean: 1 for the
  zigzag split, 2cp/(cp+1) for the contiguous one.
* ``throughput``: ``Engine.train_step`` tokens/s of the whole 2-layer model, median of
  ``--steps`` steps after two warm-ups, for cp 4, Ulysses sp 4, cp 2 x sp 2 and dp 4.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

from tetrad.config import load_strategy
from tetrad.config.schema import OptimizerConfig
from tetrad.engine import Engine
from tetrad.models import ModelArgs, Transformer
from tetrad.models.counts import activation_bytes
from tetrad.recompute.measure import graph_bytes

WORLD = 4
MEMORY = [{"dp": 4}, {"cp": 2}, {"cp": 4}, {"cp": 2, "sp": 2}, {"cp": 2, "tp": 2, "megatron_sp": True},
          {"cp": 4, "cp_load_balance": False}]
SPEED = [{"cp": 4}, {"sp": 4}, {"cp": 2, "sp": 2}, {"dp": 4}]


def model_args(a) -> ModelArgs:
    return ModelArgs(arch="llama", d_model=a.d_model, n_heads=8, n_layers=2, seq_len=a.seq_len)


def engine(a, strategy: dict) -> Engine:
    deg = strategy.get("cp", 1) * strategy.get("sp", 1) * strategy.get("tp", 1)
    s = load_strategy({**strategy, "micro_batch_size": 1})
    return Engine(Transformer(model_args(a), seed=0), strategy=s, optim_cfg=OptimizerConfig(grad_clip=0.0),
                  global_batch_size=WORLD // deg, total_steps=100)


def memory(a, strategy: dict) -> dict:
    e = engine(a, strategy)
    L = e.layout
    s = a.seq_len // (L.cp * L.sp)
    x = torch.randn(1, s // (L.tp if L.megatron_sp_active else 1), a.d_model, requires_grad=True)
    measured = graph_bytes(e.model.layers[0], x)
    formula = 2 * activation_bytes(s, 1, a.d_model, 8, t=L.tp, policy="selective", megatron_sp=L.megatron_sp_active)
    return {"bench": "context", "kind": "memory", "layout": strategy, "tokens_per_rank": s,
            "activation_bytes": measured, "formula_bytes": formula, "ratio": round(measured / formula, 3)}


def imbalance(a, cp: int, balance: bool) -> dict:
    import tetrad.parallel.context as ctx

    spent = [0.0]

    def timed(fn):
        def inner(*args):  # CPU time of this (single-threaded) rank: not stretched when
            t = time.thread_time()  # the shared cores run other ranks meanwhile
            out = fn(*args)
            spent[0] += time.thread_time() - t
            return out
        return inner

    fwd, bwd = ctx._block_forward, ctx._block_backward
    ctx._block_forward, ctx._block_backward = timed(fwd), timed(bwd)
    try:
        g = torch.Generator().manual_seed(0)
        n = a.seq_len // cp
        q, k, v = (torch.randn(1, 8, n, 16, generator=g, requires_grad=True) for _ in range(3))
        calls = []
        for i in range(a.reps + 1):
            dist.barrier()
            t = time.perf_counter()
            ctx.ring_attention(q, k, v, dist.group.WORLD, causal=True, balance=balance).sum().backward()
            if i == 0:  # warm-up
                spent[0] = 0.0
            else:
                calls.append(time.perf_counter() - t)
    finally:
        ctx._block_forward, ctx._block_backward = fwd, bwd
    per_rank = [torch.zeros(1, dtype=torch.float64) for _ in range(cp)]
    dist.all_gather(per_rank, torch.tensor([spent[0] / a.reps], dtype=torch.float64))
    work = [float(t) for t in per_rank]
    predicted = [ctx.block_work(r, cp, True, balance) for r in range(cp)]
    return {"bench": "context", "kind": "imbalance", "cp": cp, "load_balance": balance,
            "block_seconds_per_rank": [round(w, 4) for w in work],
            "max_over_mean": round(max(work) / statistics.mean(work), 3),
            "predicted_max_over_mean": round(max(predicted) / statistics.mean(predicted), 3),
            "call_s_median": round(statistics.median(calls), 4)}


def throughput(a, strategy: dict) -> dict:
    e = engine(a, strategy)  # one sequence per dp rank per step
    ids = torch.randint(0, 256, (1, a.seq_len + 1), generator=torch.Generator().manual_seed(e.dp_rank))
    times = []
    for i in range(2 + a.steps):
        dist.barrier()
        t = time.perf_counter()
        e.train_step((ids[:, :-1], ids[:, 1:]))
        dist.barrier()
        if i >= 2:
            times.append(time.perf_counter() - t)
    tokens = e.layout.dp * a.seq_len
    return {"bench": "context", "kind": "throughput", "layout": strategy,
            "step_s_median": round(statistics.median(times), 4),
            "tokens_per_s": round(tokens / statistics.median(times), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = [memory(a, s) for s in MEMORY]
    results += [imbalance(a, WORLD, b) for b in (False, True)]
    results += [throughput(a, s) for s in SPEED]
    if dist.get_rank() == 0:
        for r in results:
            print(json.dumps(r), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
