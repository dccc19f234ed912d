"""Activation recomputation: measured bytes per layer vs Korthikanti et al., and time cost.

    python bench/recompute.py [--reps 5] [--layers 2] [--shapes 128,2,64,4 256,1,128,8]

One JSON line per (arch, dropout, shape, policy): `measured_bytes` (what one block's autograd
graph keeps alive, tetrad.recompute.measure), `activation_bytes` (tetrad.models.counts: the paper's formula scaled to fp32),
and `time_ratio` = forward+backward time of a stack of `--layers` blocks under the policy over
the same under `none` (minimum of `--reps` interleaved runs, measured in this run), beside
`flop_ratio`, the ratio the paper's FLOP count predicts (backward = 2 forwards).
`selective_sac` is the rejected alternative: the whole block under torch's selective-checkpoint
API, recomputing SDPA/softmax/dropout/bmm and saving every other op's output.
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from tetrad.models.args import ModelArgs
from tetrad.models.transformer import Block
from tetrad.models.counts import activation_bytes
from tetrad.recompute import apply_block_policy, attention_core_share
from tetrad.recompute.measure import graph_bytes, measure_layer_activation_bytes

_ATEN = torch.ops.aten
_CORE_OPS = {_ATEN._scaled_dot_product_flash_attention_for_cpu.default, _ATEN._safe_softmax.default,
             _ATEN._softmax.default, _ATEN.bernoulli_.float, _ATEN.bmm.default,
             _ATEN.native_dropout.default,
             # CPU SDPA's dropout fills an empty_like in place: caching the buffer and then
             # mutating it is an error under SAC, so the mask's whole chain is recomputed.
             _ATEN.empty_like.default, _ATEN.div_.Scalar}


def _sac_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.PREFER_RECOMPUTE if op in _CORE_OPS else CheckpointPolicy.MUST_SAVE


class SACBlock(nn.Module):
    """A block under the selective-checkpoint API (for comparison only)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        # Llama's RMSNorm mutates an op output in place; SAC refuses that unless allowed.
        ctx = partial(create_selective_checkpoint_contexts, _sac_policy, allow_cache_entry_mutation=True)
        return checkpoint(self.block, x, use_reentrant=False, context_fn=ctx)


def _stack(args: ModelArgs, layers: int, policy: str) -> nn.Module:
    torch.manual_seed(0)
    blocks = [Block(args) for _ in range(layers)]
    if policy == "selective_sac":
        blocks = [SACBlock(b) for b in blocks]
    else:
        for b in blocks:
            apply_block_policy(b, policy)
    return nn.Sequential(*blocks).train()


def _fwd_bwd_seconds(model: nn.Module, x: torch.Tensor) -> float:
    xi = x.detach().requires_grad_()
    start = time.perf_counter()
    model(xi).sum().backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def _time_policies(stacks: dict[str, nn.Module], x: torch.Tensor, reps: int) -> dict[str, float]:
    """Min over reps, policies interleaved round-robin: on a shared machine a burst of load
    then hits every policy alike, and the minimum is the least disturbed run."""
    times: dict[str, list[float]] = {p: [] for p in stacks}
    for rep in range(reps + 1):
        for policy, model in stacks.items():
            t = _fwd_bwd_seconds(model, x)
            if rep:  # the first round is warm-up
                times[policy].append(t)
    return {p: min(ts) for p, ts in times.items()}


def run_shape(arch: str, dropout: float, shape: tuple[int, ...], reps: int, layers: int):
    s, b, h, a = shape
    args = ModelArgs(arch=arch, d_model=h, n_heads=a, seq_len=s, dropout=dropout)
    x = torch.randn(b, s, h)
    torch.manual_seed(0)
    block = Block(args)
    mem = measure_layer_activation_bytes(block, x)
    mem["selective_sac"] = graph_bytes(SACBlock(block).train(), x)
    times = _time_policies({p: _stack(args, layers, p) for p in mem}, x, reps)
    share = attention_core_share(s, h)
    flop = {"none": 1.0, "full": 4 / 3, "selective": 1 + share / 3, "selective_sac": 1 + share / 3}
    for policy, measured in mem.items():
        formula = activation_bytes(s, b, h, a, policy=policy.replace("_sac", ""), bytes_per_element=4)
        yield {"bench": "recompute", "arch": arch, "dropout": dropout, "s": s, "b": b, "h": h,
               "a": a, "policy": policy, "measured_bytes": measured, "paper_bytes": int(formula),
               "measured_over_paper": round(measured / formula, 3),
               "per_sbh_fp32": round(measured / (4 * s * b * h), 2),
               "time_ms": round(times[policy] * 1e3, 2),
               "time_ratio": round(times[policy] / times["none"], 3), "flop_ratio": round(flop[policy], 3),
               "layers_timed": layers, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shapes", nargs="+", default=["128,2,64,4", "256,1,128,8", "512,1,128,8",
                                                   "256,2,256,8"], help="s,b,h,a")
    opts = p.parse_args()
    torch.set_num_threads(opts.threads)
    for arch in ("gpt", "llama"):
        for dropout in (0.1, 0.0):
            for shape in opts.shapes:
                dims = tuple(int(v) for v in shape.split(","))
                for row in run_shape(arch, dropout, dims, opts.reps, opts.layers):
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
