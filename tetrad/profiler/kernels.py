"""Raw rates of the machine's kernels by size: GEMMs by (m, n, k), attention by sequence length,
element-wise traffic, host<->device copies by transfer size.

These are the points the spec cost model's curves are fitted to (``tetrad.strategy.efficiency``,
``tetrad.strategy.machine_spec``), so that this machine (or a GPU machine it runs on) can be
written as a cluster spec and planned for like one. Only measurements here: fitting and
deciding are the strategy's. Every rank runs the same kernels at the same time (``_together``
in tetrad.profiler.layers), as a step's compute does; the device is the one the profile runs on
(never assumed to be cuda).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from tetrad.profiler.layers import _sync, _together

GEMM_SHAPES = ((64, 64, 64), (128, 128, 128), (256, 256, 256), (512, 512, 512), (1024, 1024, 1024),
               (2048, 256, 256), (256, 2048, 256), (256, 256, 2048),
               # few tokens through large weights: the shape of offloaded billion-parameter
               # models trained at small batches (bench/offload_scale.py: 64 tokens, d 2-4 K)
               (64, 2048, 2048), (64, 4096, 4096), (256, 4096, 1024))
ATTENTION_SEQS = (128, 256, 512, 1024)
MIN_SAMPLE_S = 0.02


def _rate(fn, device, reps: int) -> float:
    """Median seconds of one call over ``reps`` samples of >= MIN_SAMPLE_S, after a warm-up."""
    fn()
    _sync(device)
    times = []
    for _ in range(max(1, reps)):
        _together()
        k, t0 = 0, time.perf_counter()
        while True:
            fn()
            _sync(device)
            k += 1
            if time.perf_counter() - t0 >= MIN_SAMPLE_S:
                break
        times.append((time.perf_counter() - t0) / k)
    return statistics.median(times)


def measure_gemms(device, dtype, reps: int = 3, shapes=GEMM_SHAPES) -> list[dict]:
    """Seconds of one (m, n, k) matmul per shape."""
    out = []
    for m, n, k in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        out.append({"m": m, "n": n, "k": k, "s": _rate(lambda: a @ b, device, reps)})
    return out


def measure_attention(device, dtype, reps: int = 2, seqs=ATTENTION_SEQS, heads: int = 4,
                      head_dim: int = 64) -> list[dict]:
    """Forward and backward seconds of causal scaled-dot-product attention (whichever kernel
    PyTorch picks on this device) at each sequence length, batch 1."""
    out = []
    for s in seqs:
        q, k, v = (torch.randn(1, heads, s, head_dim, device=device, dtype=dtype, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(1, heads, s, head_dim, device=device, dtype=dtype)

        def fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def both():
            F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad)
        f = _rate(fwd, device, reps)
        out.append({"seq": s, "heads": heads, "head_dim": head_dim, "fwd_s": f,
                    "bwd_s": max(_rate(both, device, reps) - f, 0.0)})
    return out


def measure_memory_bandwidth(device, dtype, numel: int = 1 << 22, reps: int = 3) -> dict:
    """Bytes per second of an element-wise add (reads two tensors, writes one)."""
    a = torch.randn(numel, device=device, dtype=dtype)
    b = torch.randn(numel, device=device, dtype=dtype)
    c = torch.empty_like(a)
    seconds = _rate(lambda: torch.add(a, b, out=c), device, reps)
    return {"bytes": 3 * numel * a.element_size(), "s": seconds}


def measure_host_device(device, sizes=(1 << 16, 1 << 20, 1 << 24, 1 << 27), reps: int = 3) -> list[dict] | None:
    """Pinned host -> device copy seconds by transfer size; None on a CPU-only machine."""
    if device.type == "cpu":
        return None
    out = []
    for n in sizes:
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        buf = torch.empty(n, dtype=torch.uint8, device=device)
        out.append({"bytes": n, "s": _rate(lambda: buf.copy_(host, non_blocking=True), device, reps)})
    return out


def measure_all(device, dtype, reps: int = 2) -> dict:
    """Every kernel family's points, for ``profile["kernels"]``."""
    return {"dtype": str(dtype).replace("torch.", ""), "device": device.type,
            "gemm": measure_gemms(device, dtype, reps), "attention": measure_attention(device, dtype, reps),
            "memory": measure_memory_bandwidth(device, dtype, reps=reps),
            "host_device": measure_host_device(device, reps=reps)}
