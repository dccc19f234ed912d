"""Bytes across nodes per step: flat ZeRO-3 vs hybrid sharding, hpZ and ZeRO++'s qwZ / qgZ.

    python bench/zeropp.py [--per-node 4] [--steps 8] [--d-model 128] [--layers 4]

Starts two torchrun agents on loopback (``--nnodes 2``, ``--per-node`` ranks each: two
simulated nodes) that train one small Llama-style model (fp32, vocab 256, seq 64, global batch
8 x nodes) under each configuration in turn, in the same world. One JSON line per
configuration, read from the run's metrics.jsonl (every rank's collectives counted by
``tetrad.traffic``, summed over the world):

* ``inter_node_bytes`` / ``intra_node_bytes``: per step (every step moves the same);
* ``inter_vs_flat``: inter-node bytes over flat ZeRO-3's (the peer, same run, same model);
* ``paper_ratio``: the ZeRO++ paper's volume model for that ratio (Wang et al. §3) with
  n = dp ranks, k = per node, on unpadded parameters: flat 3 (n - k)/n, hpZ 2 (n - k)/n,
  hybrid sharding (a node per shard group) 2 (R - 1)/R / k with R = n / k replicas, qwZ+qgZ
  at fp32 (1 + 4/256)/4 of the gathers and 1/k of the reduce; ideal padding-free volume;
* ``step_s``: median step time of steps 2.. (loopback: the two "nodes" share this machine's
  cores and memory bus, so times say little about a real cluster; the bytes are the point).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
Q = 1 + 4 / 256
CONFIGS = {
    "flat-z3": {},
    "dp_shard=node": {"dp_shard": "node"},
    "hpz=node": {"zeropp": {"hpz": "node"}},
    "qwz+qgz": {"zeropp": {"quantize_weights": True, "quantize_grads": True}},
    "zero++ (hpz+qwz+qgz)": {"zeropp": {"hpz": "node", "quantize_weights": True, "quantize_grads": True}},
}


def _strategy(spec: dict, per_node: int) -> dict:
    out = {"zero": 3, "micro_batch_size": 1}
    for key, value in spec.items():
        if isinstance(value, dict):
            out[key] = {k: per_node if v == "node" else v for k, v in value.items()}
        else:
            out[key] = per_node if value == "node" else value
    return out


def _paper_ratio(name: str, n: int, k: int) -> float:
    flat = 3 * (n - k) / n
    r = n // k
    return {"flat-z3": flat, "dp_shard=node": 2 * (r - 1) / r / k, "hpz=node": 2 * (n - k) / n,
            "qwz+qgz": (2 * (n - k) / n * Q + (r - 1) / r / k * Q) / 4,
            "zero++ (hpz+qwz+qgz)": ((n - k) / n * Q + (r - 1) / r / k * Q) / 4}[name] / flat


def worker(out: str, steps: int, d_model: int, layers: int, per_node: int) -> None:
    import torch.distributed as dist

    from tetrad.trainer.trainer import Trainer

    world = int(os.environ["WORLD_SIZE"])
    for name, spec in CONFIGS.items():
        run_dir = Path(out) / name.replace(" ", "_").replace("=", "-").replace("+", "_")
        Trainer({"run": {"output_dir": str(run_dir), "seed": 7, "steps": steps, "global_batch_size": world,
                         "precision": "fp32"},
                 "model": {"arch": "llama", "d_model": d_model, "n_layers": layers, "n_heads": 4,
                           "n_kv_heads": 2, "seq_len": 64, "vocab_size": 256},
                 "data": {"source": "builtin", "builtin_tokens": 20000},
                 "optimizer": {"lr": 1e-3, "warmup_steps": 2}, "strategy": _strategy(spec, per_node),
                 "logging": {"tensorboard": False, "progress": False}}).fit()
        dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-node", type=int, default=4)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--out", default="/tmp/tetrad_bench_zeropp")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(a.out, a.steps, a.d_model, a.layers, a.per_node)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    agent = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", str(a.per_node),
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "bench-zeropp"]
    args = [__file__, "--worker", "--out", a.out, "--steps", str(a.steps), "--d-model", str(a.d_model),
            "--layers", str(a.layers), "--per-node", str(a.per_node)]
    procs = [subprocess.Popen([*agent, "--node-rank", str(n), *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    errs = [p.communicate()[1] for p in procs]
    if any(p.returncode for p in procs):
        sys.exit(f"bench/zeropp.py: a node failed:\n{errs[0][-3000:]}\n{errs[1][-3000:]}")
    n, k = 2 * a.per_node, a.per_node
    flat = None
    for name in CONFIGS:
        run_dir = Path(a.out) / name.replace(" ", "_").replace("=", "-").replace("+", "_")
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        inter, intra = rows[-1]["comm_bytes_inter_node"], rows[-1]["comm_bytes_intra_node"]
        flat = flat or inter
        print(json.dumps({"config": name, "world": n, "per_node": k, "inter_node_bytes": inter,
                          "intra_node_bytes": intra, "inter_vs_flat": round(inter / flat, 4),
                          "paper_ratio": round(_paper_ratio(name, n, k), 4),
                          "step_s": round(statistics.median(r["step_time_s"] for r in rows[1:]), 4)}))


if __name__ == "__main__":
    main()
