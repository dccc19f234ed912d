"""Compact optimizer state: which trains closer to fp32 state -- bf16 moments with stochastic
rounding (tetrad's ``optimizer.state_dtype: bf16``), bf16 moments rounded to nearest, or
torchao's 8-bit block-wise AdamW -- and what each costs per element.

    python bench/compact_state.py [--steps 300] [--d-model 64] [--layers 4]

One plain-torch loop per optimizer on the same model (tetrad's Llama, per-name init), the same
batches of the built-in corpus (global batch 8 x 64 tokens), AdamW lr 3e-3, betas (0.9, 0.95),
weight decay 0.1, 10 warmup steps then constant. One JSON line per optimizer: the final loss
(mean of the last 20 steps), its relative distance to fp32 state's, the largest per-step
relative loss gap, and the optimizer step's ns per parameter on one 16 MiB tensor (median of 7).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def _rounded_to_nearest():
    """AdamW with bf16 moments rounded to nearest: tetrad's kernel without the noise."""
    from tetrad.zero import compact

    class NearestAdamW(compact.CompactAdamW):
        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    st = self._state(p)
                    st["step"] += 1
                    hp = compact._hyper(group, int(st["step"]), p.device)
                    m32 = st["exp_avg"].float().lerp(p.grad, hp[0])
                    v32 = st["exp_avg_sq"].float() * hp[1] + p.grad * p.grad * hp[2]
                    p.mul_(hp[6]).add_(m32 / (v32.sqrt() * hp[4] + hp[5]) * hp[3])
                    st["exp_avg"].copy_(m32)
                    st["exp_avg_sq"].copy_(v32)
    return NearestAdamW


def optimizers() -> dict:
    from tetrad.zero.compact import CompactAdamW

    out = {"fp32": lambda ps, **kw: torch.optim.AdamW(ps, fused=True, **kw),
           "bf16_stochastic (tetrad)": CompactAdamW,
           "bf16_nearest": _rounded_to_nearest()}
    try:
        from torchao.optim import AdamW8bit

        out["8bit_blockwise (torchao)"] = lambda ps, **kw: AdamW8bit(ps, block_size=256, **kw)
    except ImportError:
        pass
    return out


def train(make, steps: int, d_model: int, layers: int) -> list[float]:
    from tetrad.data import build_dataset
    from tetrad.models import build_model
    from tetrad.models.loss import cross_entropy

    cfg = {"arch": "llama", "vocab_size": 256, "d_model": d_model, "n_layers": layers, "n_heads": 4,
           "n_kv_heads": 2, "seq_len": 64, "dropout": 0.0}
    model = build_model(cfg, seed=7)
    data = build_dataset("builtin", 64, 7, 200_000, 256)
    opt = make(list(model.parameters()), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    g = torch.Generator().manual_seed(7)
    losses = []
    for t in range(steps):
        for group in opt.param_groups:
            lr = 3e-3 * min(1.0, (t + 1) / 10)
            if isinstance(group["lr"], torch.Tensor):  # torchao keeps lr as a tensor (no recompiles)
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        x, y = data.get_batch(torch.randint(0, len(data), (8,), generator=g).tolist())
        loss = cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def ns_per_param(make, numel: int = 4 * 2**20) -> float:
    p = torch.nn.Parameter(torch.randn(numel))
    p.grad = torch.randn(numel)
    opt = make([p], lr=1e-4)
    opt.step()  # state allocated (and kernels compiled) outside the timing
    times = []
    for _ in range(7):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return statistics.median(times) / numel * 1e9


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--only", default="", help="comma-separated names (fp32 is always run: the reference)")
    args = ap.parse_args()
    import os

    runs = {}
    wanted = {w.strip() for w in args.only.split(",") if w.strip()}
    for name, make in optimizers().items():
        if wanted and name != "fp32" and not any(w in name for w in wanted):
            continue
        start = time.perf_counter()
        losses = train(make, args.steps, args.d_model, args.layers)
        runs[name] = losses
        ref = runs["fp32"]
        final, ref_final = statistics.mean(losses[-20:]), statistics.mean(ref[-20:])
        print(json.dumps({"state": name, "steps": args.steps, "final_loss": round(final, 5),
                          "rel_to_fp32": round((final - ref_final) / ref_final, 5),
                          "max_step_gap": round(max(abs(a - b) / b for a, b in zip(losses, ref)), 5),
                          "ns_per_param": round(ns_per_param(make), 2), "train_s": round(time.perf_counter() - start, 1),
                          "loadavg": [round(v, 1) for v in os.getloadavg()]}), flush=True)


if __name__ == "__main__":
    main()
