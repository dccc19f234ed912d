"""Run several training configs in one launched world; rank 0 writes what the tests read.

Started by tests/test_zeropp_parity.py under torchrun (``--nnodes 2``: two agents on loopback,
so LOCAL_WORLD_SIZE tells tetrad the node size, as on a cluster). Usage:
``zeropp_runs.py OUT RUNS_JSON`` with RUNS_JSON a list of [name, strategy dict]; writes
OUT/results.json: per run the losses, the per-step metrics comm_bytes_* (read back from
metrics.jsonl), the flat groups' (numel, shard group size), and under qwZ the per-tensor
quantization error of the weights as every rank computes with them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from test_dp_parity import tiny_config  # noqa: E402

STEPS = 20


def _weight_errors(dp) -> dict[str, list[float]]:
    """Per tensor, on every rank's primary shard (what qwZ sends), reduced over the world:
    [max |dequant(quant(w)) - w| / max |w|, and the largest share of its block's bound
    max|w_block| / 254 an element reached (<= 1: the quantizer's bound holds)]."""
    from tetrad.zero.quant import dequantize, error_bound, quantize

    names: list[str] = sorted({n for g in dp.groups for n in g.names})
    stats = torch.zeros(3, len(names), dtype=torch.float64)  # error, max |w|, error / bound
    for g in dp.groups:
        shard = dp.params.shards.get(g).detach().float().cpu()
        err = (dequantize(*quantize(shard), shard.numel()) - shard).abs()
        share = err / error_bound(shard).clamp_min(1e-30)
        for name, _, _, sl in g.overlaps():
            i = names.index(name)
            for row, value in enumerate((err[sl].max(), shard[sl].abs().max(), share[sl].max())):
                stats[row, i] = max(stats[row, i], float(value))
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    return {n: [float(stats[0, i] / stats[1, i]) if stats[1, i] > 0 else 0.0, float(stats[2, i])]
            for i, n in enumerate(names)}


def main(out: str, runs: list) -> None:
    from tetrad.trainer.trainer import Trainer

    results = {}
    for name, strategy in runs:
        cfg = tiny_config(f"{out}/{name}", **strategy)
        cfg["run"]["steps"] = STEPS
        trainer = Trainer(cfg)
        history = trainer.fit()
        dp = trainer.engine.data_parallel
        metrics = [json.loads(line) for line in Path(f"{out}/{name}/metrics.jsonl").read_text().splitlines()]
        results[name] = {
            "loss": [r["loss"] for r in history],
            "intra": [m.get("comm_bytes_intra_node") for m in metrics],
            "inter": [m.get("comm_bytes_inter_node") for m in metrics],
            "groups": [(g.numel, g.world) for g in dp.groups],
        }
        if strategy.get("zeropp", {}).get("quantize_weights"):
            results[name]["weight_error"] = _weight_errors(dp)
        dist.barrier()
    if dist.get_rank() == 0:
        Path(out, "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
