"""One GPU: a ~1B Llama-style model in bf16, eager and compiled, and ZeRO-3 with its optimizer on
the CPU against the resident step.

    python bench/gpu.py              # on a machine with one CUDA GPU, ~5 minutes
    python bench/gpu.py --cpu-smoke  # the same code paths on the CPU with a tiny model (CI)

One JSON line per result:

* ``{"matmul": ...}``: the measured bf16 GEMM rate (8192^3, median of 10) beside the device's
  datasheet dense peak (``PEAK_TFLOPS`` by device name; null when unknown): the two physical
  bounds MFU is quoted against;
* one line per variant (``eager``, ``compile``, ``resident_zero0``, ``zero3_cpu_offload``):
  median step seconds of the timed steps, tokens/s, model FLOPs per second (Korthikanti's
  count, ``tetrad.models.flops_per_token``), MFU against the peak and against the measured
  GEMM rate, peak device memory;
* ``{"offload_vs_resident": ratio}``: ZeRO-3 + CPU optimizer step time over the resident one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tetrad.config.schema import OptimizerConfig  # noqa: E402
from tetrad.engine import Engine  # noqa: E402
from tetrad.models import ModelArgs, build_model, flops_per_token  # noqa: E402
from tetrad.models.counts import num_params  # noqa: E402

# Dense bf16 tensor-core peaks from the vendors' datasheets, TF/s (no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
               "A100": 312.0, "L40S": 362.0, "L4": 121.0}
ONE_B = {"arch": "llama", "vocab_size": 32000, "d_model": 2048, "n_layers": 16, "n_heads": 32,
         "n_kv_heads": 8, "seq_len": 2048, "dropout": 0.0}
TINY = {"arch": "llama", "vocab_size": 256, "d_model": 64, "n_layers": 1, "n_heads": 4,
        "n_kv_heads": 2, "seq_len": 32, "dropout": 0.0}


def sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def matmul_tflops(device: torch.device, n: int, reps: int) -> float:
    dtype = torch.bfloat16 if device.type != "cpu" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = []
    for _ in range(reps + 2):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times[2:]) / 1e12


def run_variant(name: str, model_cfg: dict, strategy: dict, compile: bool, steps: int, mbs: int,
                device: torch.device, precision: str) -> dict:
    if device.type != "cpu":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(model_cfg, seed=0)
    n_params = num_params(model)
    engine = Engine(model, strategy={"micro_batch_size": mbs, **strategy}, precision=precision,
                    optim_cfg=OptimizerConfig(lr=1e-4, warmup_steps=0, grad_clip=1.0),
                    global_batch_size=mbs, total_steps=steps, compile=compile)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model_cfg["vocab_size"], (mbs, model_cfg["seq_len"] + 1), generator=g)
    times, losses = [], []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        losses.append(engine.train_step((ids[:, :-1], ids[:, 1:])))
        sync(device)
        times.append(time.perf_counter() - t0)
    engine.close()
    step_s = statistics.median(times[2:] if len(times) > 3 else times[1:])
    tokens = mbs * model_cfg["seq_len"]
    flops = flops_per_token(ModelArgs.from_config(model_cfg)) * tokens / step_s
    peak = (torch.cuda.max_memory_allocated(device) / 2**20) if device.type != "cpu" else None
    return {"variant": name, "params": n_params, "step_s": step_s, "first_step_s": times[0],
            "tokens_per_s": tokens / step_s, "model_tflops": flops / 1e12, "losses": losses,
            "peak_device_mb": peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU: checks the script")
    ap.add_argument("--steps", type=int, default=None)
    args = ap.parse_args()
    smoke = args.cpu_smoke
    device = torch.device("cpu") if smoke else torch.device("cuda", torch.cuda.current_device())
    if not smoke and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU here; use --cpu-smoke to check the script"}))
        return 2
    if smoke:  # even on a machine that has a GPU
        os.environ["TETRAD_DEVICE"] = "cpu"
    cfg, steps, mbs = (TINY, args.steps or 3, 2) if smoke else (ONE_B, args.steps or 8, 4)
    precision = "fp32" if smoke else "bf16"
    gemm = matmul_tflops(device, 256 if smoke else 8192, 3 if smoke else 10)
    peak = peak_tflops(device)
    print(json.dumps({"matmul": {"device": torch.cuda.get_device_name(device) if not smoke else "cpu",
                                 "measured_tflops": gemm, "peak_tflops": peak,
                                 "torch": torch.__version__}}), flush=True)
    rows = {}
    for name, strategy, compile in (("eager", {}, False), ("compile", {}, True),
                                    ("resident_zero0", {}, False),
                                    ("zero3_cpu_offload", {"zero": 3, "offload": {"optimizer": "cpu"}}, False)):
        row = run_variant(name, cfg, strategy, compile, steps, mbs, device, precision)
        row["mfu_vs_peak"] = row["model_tflops"] / peak if peak else None
        row["mfu_vs_matmul"] = row["model_tflops"] / gemm
        rows[name] = row
        print(json.dumps(row), flush=True)
    ratio = rows["zero3_cpu_offload"]["step_s"] / rows["resident_zero0"]["step_s"]
    print(json.dumps({"offload_vs_resident": ratio,
                      "compile_speedup": rows["eager"]["step_s"] / rows["compile"]["step_s"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
