"""Tensor / sequence parallelism at world 4: tokens/s and per-layer activation memory per
layout, against torch's DTensor tensor parallelism on the same model, in one run.

    torchrun --nproc_per_node 4 bench/tp_sp.py [--d-model 128 --seq-len 128 --steps 5]

Prints one JSON line per layout (rank 0). tetrad layouts run ``Engine.train_step`` (forward,
backward, optimizer step); the DTensor peer runs the same model under
``parallelize_module`` with ColwiseParallel / RowwiseParallel (+ SequenceParallel for the
norms) and a plain fwd / bwd / AdamW step. Gradient clipping is off for both. Activation
memory is the bytes one block's autograd graph keeps alive (``tetrad.recompute.measure.graph_bytes``), with
Korthikanti et al.'s formula beside it (fp32 = 2x the 16-bit bytes, no s x s term: the CPU
attention kernel saves none at dropout 0).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tetrad.config import load_strategy
from tetrad.config.schema import OptimizerConfig
from tetrad.models import ModelArgs, Transformer
from tetrad.models.counts import activation_bytes
from tetrad.recompute.measure import graph_bytes
from tetrad.engine import Engine

LAYOUTS = [{"dp": 4}, {"tp": 4}, {"tp": 4, "megatron_sp": True}, {"tp": 2}, {"tp": 2, "megatron_sp": True},
           {"sp": 4}, {"tp": 2, "sp": 2, "megatron_sp": True}]


def model_args(a) -> ModelArgs:
    return ModelArgs(arch="llama", d_model=a.d_model, n_heads=8, n_layers=a.layers, seq_len=a.seq_len)


def batch(a, rows: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (rows, a.seq_len + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def timed(step, steps: int) -> float:
    for _ in range(2):
        step()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    dist.barrier()
    return time.perf_counter() - start


def block_input(a, b: int, tp: int, sp: int, msp: bool) -> torch.Tensor:
    """What one block sees on a rank: its micro-batch, its sequence shard."""
    s = a.seq_len // sp // (tp if msp else 1)
    return torch.randn(b, s, a.d_model, requires_grad=True)


def run_tetrad(a, strategy: dict) -> dict:
    dp = 4 // (strategy.get("tp", 1) * strategy.get("sp", 1))
    s = load_strategy({**strategy, "micro_batch_size": a.batch // dp})  # one micro-batch per step
    engine = Engine(Transformer(model_args(a), seed=0), strategy=s, optim_cfg=OptimizerConfig(grad_clip=0.0),
                    global_batch_size=a.batch, total_steps=100)
    ids, labels = batch(a, a.batch // engine.layout.dp)
    seconds = timed(lambda: engine.train_step((ids, labels)), a.steps)
    x = block_input(a, a.batch // dp, s.tp, s.sp, s.megatron_sp)
    mem = graph_bytes(engine.model.layers[0], x)
    formula = 2 * activation_bytes(a.seq_len // s.sp, a.batch // dp, a.d_model, 8, t=s.tp,
                                   policy="selective", megatron_sp=s.megatron_sp)
    return {"impl": "tetrad", "layout": strategy, "seconds": seconds, "activation_bytes": mem,
            "formula_bytes": formula}


def dtensor_plan(sequence: bool) -> dict:
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel)

    out = Shard(1) if sequence else Replicate()
    plan = {"tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=out),
            "lm_head": ColwiseParallel(input_layouts=out, output_layouts=Replicate())}
    for i in range(64):
        p = f"layers.{i}."
        plan |= {p + n: ColwiseParallel() for n in ("attn.q_proj", "attn.k_proj", "attn.v_proj",
                                                    "mlp.gate_proj", "mlp.up_proj")}
        plan |= {p + n: RowwiseParallel(output_layouts=out) for n in ("attn.o_proj", "mlp.down_proj")}
        if sequence:
            plan |= {p + n: SequenceParallel() for n in ("attn_norm", "mlp_norm")}
            gather = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
            plan |= {p + n: gather for n in ("attn", "mlp")}
    if sequence:
        plan["norm"] = SequenceParallel()
    return plan


def run_dtensor(a, sequence: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    mesh = init_device_mesh("cpu", (4,), mesh_dim_names=("tp",))
    model = Transformer(model_args(a), seed=0)
    plan = {k: v for k, v in dtensor_plan(sequence).items()
            if not k.startswith("layers.") or int(k.split(".")[1]) < a.layers}
    model = parallelize_module(model, mesh, plan)
    # foreach needs every parameter to be a DTensor; replicated norms stay plain tensors.
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    ids, labels = batch(a, a.batch)

    def step():
        loss = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()

    seconds = timed(step, a.steps)
    mem = graph_bytes(model.layers[0], block_input(a, a.batch, 4, 1, sequence))
    return {"impl": "dtensor", "layout": {"tp": 4, "megatron_sp": sequence}, "seconds": seconds,
            "activation_bytes": mem,
            "formula_bytes": 2 * activation_bytes(a.seq_len, a.batch, a.d_model, 8, t=4,
                                                  policy="selective", megatron_sp=sequence)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = [run_tetrad(a, dict(s)) for s in LAYOUTS] + [run_dtensor(a, seq) for seq in (False, True)]
    for r in results:
        r["tokens_per_s"] = a.batch * a.seq_len * a.steps / r.pop("seconds")
        if dist.get_rank() == 0:
            print(json.dumps(r), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
