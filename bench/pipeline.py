"""Pipeline schedules at pp=4: tokens/s and measured bubble, with the theoretical bubble beside.

    python bench/pipeline.py [--model sleep|transformer] [--micro-batches 8] [--steps 4] [--trace DIR]

One JSON line per schedule. ``bubble`` is the mean over ranks of 1 - busy/makespan (busy =
time inside F/B/W; makespan = from a pp barrier to the slowest rank's last action), for the
step with the shortest makespan (``_best``: least disturbed by other tenants of a shared
machine) and the median one; ``bubble_theory`` is the papers' formula (Narayanan et al.; Qi
et al. with T_F = T_B = T_W; Lamy-Poirier for breadth-first; 0 for ZB-V, the paper's
steady-state figure) and ``bubble_simulated`` what ``pipeline.simulate`` gives for the exact
action lists on the same costs (fill and drain of a finite step included). ``of_bound`` is the busiest rank's compute time over the step
time: the fraction of the physical bound (no bubble, no communication) reached. ``--model sleep`` (default) uses layers that sleep T per pass (``pipeline.synthetic``),
so schedules are compared without four ranks fighting over a small machine's cores;
``--model transformer`` runs a real tiny Llama (d_model 64) and its numbers include that
contention. ``--trace DIR`` writes Chrome traces, one file per schedule and rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist

from spawn import spawn_ranks  # bench/ is sys.path[0] when a benchmark runs as a script

P = 4
SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zero_bubble", 1), ("zero_bubble_v", 1),
             ("breadth_first", 2)]
MBS, SEQ, D, LAYERS = 1, 32, 64, 8


def _model(kind: str, t: float):
    if kind == "sleep":
        from tetrad.parallel.pipeline.synthetic import SleepModel

        return SleepModel(LAYERS, (t, t, t), vocab=256, d=D)
    from tetrad.models import ModelArgs, Transformer

    return Transformer(ModelArgs(arch="llama", vocab_size=256, d_model=D, n_layers=LAYERS, n_heads=4,
                                 seq_len=SEQ), seed=0)


def _worker(rank: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=P)
    from tetrad.models import cross_entropy
    from tetrad.parallel.pipeline import build_pipeline

    ids = torch.randint(0, 256, (args.micro_batches, MBS, SEQ), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, v in SCHEDULES:
        trace = f"{args.trace}/{name}.json" if args.trace else None
        ex = build_pipeline(_model(args.model, args.t), dist.group.WORLD, schedule=name, virtual_stages=v,
                            act_shape=(MBS, SEQ, D), dtype=torch.float32, device=torch.device("cpu"),
                            loss_fn=cross_entropy, trace=trace, instrument=True)
        stats = []
        for _ in range(1 + args.steps):
            ex.run(list(ids), list(ids), scale=lambda loss: loss / len(ids))
            stats.append(dict(ex.stats))
        out[name] = stats[1:]
    queue.put((rank, out))
    dist.destroy_process_group()


def _summarise(name: str, v: int, per_rank: list[dict], args) -> dict:
    from tetrad.parallel.pipeline import build_schedule, bubble, placement, simulate, theoretical_bubble

    spans = [s["makespan_s"] for s in per_rank[0][name]]
    tokens = args.micro_batches * MBS * SEQ
    sim = bubble(simulate(build_schedule(name, P, args.micro_batches, v), (1.0, 1.0, 1.0),
                          placement=placement(name, P, v)))
    out = {"bench": "pipeline", "model": args.model, "schedule": name, "pp": P, "virtual_stages": v,
           "micro_batches": args.micro_batches,
           "bubble_theory": round(theoretical_bubble(name, P, args.micro_batches, v, (1.0, 1.0, 1.0)), 3),
           "bubble_simulated": round(sum(sim) / P, 3),
           "peak_in_flight_stage0": max(s["peak_in_flight"] for s in per_rank[0][name])}
    for label, span in (("best", min(spans)), ("median", statistics.median_high(spans))):
        i = spans.index(span)
        busy = [r[name][i]["busy_s"] for r in per_rank]
        out.update({f"step_s_{label}": round(span, 4), f"tokens_per_s_{label}": round(tokens / span, 1),
                    f"bubble_{label}": round(sum(1 - b / span for b in busy) / P, 3),
                    f"of_bound_{label}": round(max(busy) / span, 3)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("sleep", "transformer"), default="sleep")
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--t", type=float, default=0.02, help="sleep model: seconds per layer per pass")
    parser.add_argument("--trace", default=None, help="directory for Chrome traces")
    args = parser.parse_args()
    per_rank = [out for _, out in spawn_ranks(_worker, P, args)]
    for name, v in SCHEDULES:
        print(json.dumps(_summarise(name, v, per_rank, args)), flush=True)


if __name__ == "__main__":
    main()
