"""ZeRO-3 under every pipeline schedule at pp=2 x dp=2: units gathered per step, full gradients
left when the schedule ends, step time; 1F1B is the peer each schedule is compared to.

    PYTHONPATH=$PWD python3 bench/zero_pipeline.py [--steps 6] [--micro-batches 4] [--zero 3]

One JSON line per schedule and pipeline stage (dp rank 0 of the stage). A tiny Llama (d_model
32, 8 layers, 4 pipeline chunks of 2 under the looped schedules) trained through the Trainer,
so what is counted is what training does: ``gathers_per_step`` from the step metrics
(``pipeline_zero3_gathers``: units all-gathered, ``tetrad.zero.stage3``), ``grads_left`` the
gradient elements still full-size (``param.grad``) when the schedule is done and the step's
reduce begins (breadth-first reduces each chunk's after its last backward), ``units`` the
stage's ZeRO-3 units and ``units_x_micro_batches`` what one gather per unit per micro-batch
would be. ``step_s_median`` is over the steps after the first; on a small shared CPU box four
ranks contend for cores, so times rank nothing, the counts are the result. ``final_loss``
is the same under every schedule (the parity tests check the whole curve).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

from spawn import spawn_ranks  # bench/ is sys.path[0] when a benchmark runs as a script

SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zero_bubble", 1), ("zero_bubble_v", 1),
             ("breadth_first", 2)]
WORLD = 4


def _config(out: str, args, schedule: str, v: int) -> dict:
    return {"run": {"output_dir": out, "seed": 7, "steps": args.steps, "precision": "fp32",
                    "global_batch_size": 2 * args.micro_batches},  # dp 2 x micro-batch 1
            "model": {"arch": "llama", "d_model": 32, "n_layers": 8, "n_heads": 4, "n_kv_heads": 2,
                      "seq_len": 16, "dropout": 0.0},
            "data": {"source": "builtin", "builtin_tokens": 20000},
            "optimizer": {"lr": 1e-2, "warmup_steps": 2},
            "strategy": {"pp": 2, "zero": args.zero, "micro_batch_size": 1, "pipeline_schedule": schedule,
                         "virtual_stages": v},
            "logging": {"tensorboard": False, "progress": False}}


def _run(rank: int, port: int, args, queue) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "OMP_NUM_THREADS": "1"})
    import torch

    torch.set_num_threads(1)
    from tetrad.trainer.trainer import Trainer

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, v in SCHEDULES:
            trainer = Trainer(_config(f"{tmp}/{name}", args, name, v))
            left: list[int] = []
            build = trainer._build  # the engine is built inside fit: count at its reduce
            trainer._build = lambda: (build(), _count_left(trainer.engine, left))
            records = trainer.fit()
            e = trainer.engine
            units = len(getattr(e.data_parallel.params, "units", ()))
            out[name] = {"stage": e.layout.rank("pp"), "dp_rank": e.dp_rank, "units": units,
                         "gathers": [r["pipeline_zero3_gathers"] for r in records], "grads_left": left,
                         "step_s": [r["step_time_s"] for r in records[1:]], "loss": records[-1]["loss"]}
    queue.put((rank, out))


def _count_left(engine, left: list[int]) -> None:
    dp = engine.data_parallel
    finish = dp.finish

    def counted():
        left.append(sum(p.grad.numel() for p in engine.model.parameters() if p.grad is not None))
        finish()
    dp.finish = counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro-batches", type=int, default=4, help="per step and dp rank (a multiple of 2)")
    parser.add_argument("--zero", type=int, default=3, choices=(2, 3))
    args = parser.parse_args()
    per_rank = [out for _, out in spawn_ranks(_run, WORLD, args)]
    for name, v in SCHEDULES:
        for r in per_rank:
            row, peer = r[name], r["1f1b"]
            if row["dp_rank"] != 0:
                continue
            gathers = statistics.median(row["gathers"])
            print(json.dumps({
                "bench": "zero_pipeline", "zero": args.zero, "schedule": name, "virtual_stages": v,
                "pp": 2, "dp": 2, "micro_batches": args.micro_batches, "stage": row["stage"],
                "units": row["units"], "gathers_per_step": gathers,
                "units_x_micro_batches": row["units"] * args.micro_batches,
                "gathers_vs_1f1b": round(gathers / max(statistics.median(peer["gathers"]), 1), 3),
                "grads_left": statistics.median(row["grads_left"]),
                "grads_left_1f1b": statistics.median(peer["grads_left"]),
                "step_s_median": round(statistics.median(row["step_s"]), 4),
                "step_vs_1f1b": round(statistics.median(row["step_s"]) / statistics.median(peer["step_s"]), 3),
                "final_loss": round(row["loss"], 6)}), flush=True)


if __name__ == "__main__":
    main()
