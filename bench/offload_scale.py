"""How large a Llama-style model trains on this machine with NVMe offload (ZeRO-3, parameters
and optimizer state in files), and how close its I/O comes to the disk.

    python bench/offload_scale.py --nvme-dir /tmp/tetrad-nvme [--sizes 0.5,1,2,4] [--steps 2]
    python bench/offload_scale.py --nvme-dir DIR --io-only      # disk bandwidth only
    python bench/offload_scale.py --nvme-dir DIR --aio          # FileIO vs DeepSpeed's libaio op
    python bench/offload_scale.py --nvme-dir DIR --stream       # the optimizer phase alone
    python bench/offload_scale.py --nvme-dir DIR --adam         # fused AdamW vs DeepSpeedCPUAdam
    python bench/offload_scale.py --nvme-dir DIR --mode overlap # buckets stepped during backward
    python bench/offload_scale.py --nvme-dir DIR --sizes 2.75 --host-memory-gb auto   # placement
    python bench/offload_scale.py --nvme-dir DIR --sizes 8b --mode overlap --state-dtype bf16 \
        --host-memory-gb auto                                  # Llama-3-8B-shaped, bf16 moments

First the disk's sequential bandwidth is measured in this run (O_DIRECT, 64 MiB requests,
one thread: what ``dd oflag=direct bs=64M`` does, and the same through tetrad's FileIO with 4
threads). Then each size of the ladder, smallest first, runs in a fresh process (so peak RSS
is its own): deferred init, ``--steps`` optimizer steps of micro-batch 1 x ``--seq`` tokens in
fp32. A size whose files (16 bytes/param: master = compute parameter, grad, exp_avg,
exp_avg_sq; 12 with ``--mode overlap``, which never stores gradients) would not fit in the
free disk, less 10% headroom, is skipped and said so; the ladder stops at the first size that
fails. One JSON line per result.

``--host-memory-gb N|auto`` (``strategy.offload.host_memory_gb``) keeps the hottest state in
host memory and only the rest in files; ``--state-dtype bf16`` stores Adam's moments in bf16.
Size ``8b`` is Llama-3-8B's shape (d 4096, 32 layers, 32 heads, 8 KV heads, d_ff 14336,
vocab 128256). Before each size the free disk is checked against what its files will take
(the placement's disk bytes, estimated by the cost model, ``tetrad.strategy.offload_cost``,
+10%); a size that does not fit scales down to the largest smaller rung that does, and says so.

Reported per size: params, peak RSS, disk bytes, the placement (bytes per tier), s/step (each
step), bytes read and written per step, their rate over the step, the achieved read and write
bandwidth as fractions of the disk's measured in this run, ``io_bound_s`` (the time the
step's bytes need at that bandwidth: ``disk_share = io_bound_s / step_s`` is the share of the
step the disk is busy), the same for the optimizer phase alone (``opt_phase_disk_fraction``),
the cost model's predicted s/step for the same run (``predicted_s``, from the machine spec
``--spec``, if given) and the load average. ``--stream`` measures the optimizer phase without a
model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

SIZES = {  # nominal billions -> (d_model, n_layers); vocab 32000, heads of 128, SwiGLU 8h/3
    0.1: (768, 12), 0.5: (1536, 16), 0.75: (1792, 18), 0.9: (2048, 16), 1: (2048, 20),
    1.25: (2048, 24), 1.5: (2304, 22), 2: (2560, 24), 2.5: (2560, 30), 2.75: (2816, 27),
    3: (2816, 30), 4: (3072, 34), 5: (3584, 32), 6: (4096, 29),
}
LLAMA3_8B = {"arch": "llama", "vocab_size": 128256, "d_model": 4096, "n_layers": 32, "n_heads": 32,
             "n_kv_heads": 8, "d_ff": 14336, "rope_theta": 500000.0, "dropout": 0.0}


def model_cfg(size, seq: int) -> dict:
    if size == "8b":
        return {**LLAMA3_8B, "seq_len": seq}
    d, layers = SIZES[size]
    return {"arch": "llama", "vocab_size": 32000, "d_model": d, "n_layers": layers,
            "n_heads": d // 128, "n_kv_heads": d // 128, "seq_len": seq, "dropout": 0.0}


def disk_bandwidth(nvme_dir: str, nbytes: int = 2 * 2**30) -> dict:
    """Sequential write then read of ``nbytes``: one thread, 64 MiB O_DIRECT requests (dd's
    way, the reference), and tetrad's FileIO (4 threads, 8 MiB blocks)."""
    from tetrad.offload.pool import aligned_empty
    from tetrad.offload.store import NvmeStore

    buf = aligned_empty(nbytes)
    buf.fill_(7)
    out = {}
    for label, threads, block in (("dd", 1, 64 * 2**20), ("fileio", 4, 8 * 2**20)):
        store = NvmeStore(nvme_dir, threads=threads, block_bytes=block)
        out["direct"] = store.direct
        store.create("bw", nbytes)
        t = time.perf_counter()
        store.write("bw", buf).wait()
        os.sync()
        out[f"{label}_write_MBps"] = nbytes / (time.perf_counter() - t) / 1e6
        t = time.perf_counter()
        store.read("bw", buf).wait()
        out[f"{label}_read_MBps"] = nbytes / (time.perf_counter() - t) / 1e6
        store.close()
    return out


def compare_aio(nvme_dir: str, nbytes: int = 2**30, reps: int = 3) -> dict:
    """tetrad FileIO (4 threads, 8 MiB blocks) vs DeepSpeed's async_io op (libaio; needs
    ``apt-get install libaio-dev`` and builds on first use), same buffer and file size,
    interleaved, best of ``reps``: whether an extra dependency would be faster."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from tetrad.offload.pool import aligned_empty
    from tetrad.offload.store import NvmeStore

    handle = AsyncIOBuilder().load(verbose=False).aio_handle(8 * 2**20, 32, False, True, 4)
    buf = aligned_empty(nbytes)
    buf.fill_(1)
    best = {"tetrad": [0.0, 0.0], "deepspeed_aio": [0.0, 0.0]}
    for _ in range(reps):
        store = NvmeStore(nvme_dir, threads=4, block_bytes=8 * 2**20)
        store.create("f", nbytes)
        path = os.path.join(nvme_dir, "ds_aio.bin")
        ops = {"tetrad": (lambda: store.write("f", buf).wait(), lambda: store.read("f", buf).wait()),
               "deepspeed_aio": (lambda: handle.sync_pwrite(buf, path), lambda: handle.sync_pread(buf, path))}
        for name, (write, read) in ops.items():
            for k, op in enumerate((write, read)):
                t = time.perf_counter()
                op()
                os.sync()
                best[name][k] = max(best[name][k], nbytes / (time.perf_counter() - t) / 1e6)
        store.close()
        os.unlink(path)
    return {name: {"write_MBps": w, "read_MBps": r} for name, (w, r) in best.items()}


def stream_bandwidth(nvme_dir: str, gib: float = 2.0, ahead: int = 1, threads: int = 4) -> dict:
    """The optimizer phase alone: ``StateSwapper.stream`` over ``gib`` GiB per key of fp32
    pieces (master, grad, exp_avg, exp_avg_sq read; all but grad written back), with torch's
    fused AdamW stepping each piece as ``OffloadedMaster`` does. Reported as the share of the
    disk's time the phase kept busy at the bandwidths measured in the same run."""
    import torch

    from tetrad.offload.store import NvmeStore
    from tetrad.offload.swapper import StateSwapper
    from tetrad.offload.tier import PIECE

    keys = ["master", "exp_avg", "exp_avg_sq", "grad"]
    n = max(1, int(gib * 2**30 / 4 / PIECE))
    store = NvmeStore(nvme_dir, threads=threads)
    swapper = StateSwapper(store, [PIECE] * n, keys, ahead=ahead)
    fill = torch.full((PIECE,), 0.5)
    for b in range(n):
        for k in keys:
            swapper.put(b, k, fill).wait()
    swapper.flush()
    os.sync()
    slot = torch.zeros(PIECE)
    opt = torch.optim.AdamW([slot], lr=1e-4, fused=True)
    r0, w0, t = store.io.bytes_read, store.io.bytes_written, time.perf_counter()
    for _, views in swapper.stream(range(n), keys=keys, write=keys[:3]):
        slot.set_(views["master"])
        slot.grad = views["grad"]
        st = opt.state[slot]
        if st:
            st["exp_avg"].set_(views["exp_avg"])
            st["exp_avg_sq"].set_(views["exp_avg_sq"])
        opt.step()
    swapper.flush()
    seconds = time.perf_counter() - t
    out = {"ahead": ahead, "threads": threads, "pieces": n, "seconds": seconds,
           "read_bytes": store.io.bytes_read - r0, "written_bytes": store.io.bytes_written - w0}
    store.close()
    return out


def _timed_optimizer_phase(engine, io, phases: list) -> None:
    """Record (seconds, bytes read, bytes written) of every call of the engine's optimizer
    step: in ``sync`` mode the whole offloaded step; in ``overlap`` mode only the wait for
    the groups still being stepped when backward ends."""
    inner = engine.data_parallel.step

    def step(*args, **kwargs):
        r0, w0, t = io.bytes_read, io.bytes_written, time.perf_counter()
        out = inner(*args, **kwargs)
        phases.append((time.perf_counter() - t, io.bytes_read - r0, io.bytes_written - w0))
        return out

    engine.data_parallel.step = step


def compare_adam(numel: int = 4 * 2**20, reps: int = 20) -> dict:
    """Host AdamW on one offload piece: torch's fused CPU kernel (what tetrad uses) vs
    DeepSpeed's ``DeepSpeedCPUAdam`` (its AVX op, built on first use), interleaved, median
    ns per element: whether the step should take the extra dependency."""
    import statistics

    import torch
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    def timed(make) -> list[float]:
        p = torch.nn.Parameter(torch.randn(numel))
        p.grad = torch.randn(numel)
        opt = make([p])
        opt.step()  # state allocated outside the timing
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            opt.step()
            out.append((time.perf_counter() - t) / numel * 1e9)
        return out

    runs = {"torch_fused": [], "deepspeed_cpu_adam": []}
    for _ in range(3):
        runs["torch_fused"] += timed(lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True))
        runs["deepspeed_cpu_adam"] += timed(lambda ps: DeepSpeedCPUAdam(ps, lr=1e-4, adamw_mode=True))
    return {k: {"ns_per_elem_median": statistics.median(v)} for k, v in runs.items()}


def child(size, nvme_dir: str, steps: int, seq: int, mode: str = "sync", host_memory_gb="0",
          state_dtype: str = "fp32") -> dict:
    import torch

    from tetrad.config.schema import OptimizerConfig
    from tetrad.offload.deferred import deferred_transformer
    from tetrad.engine import Engine
    from tetrad.trainer.metrics import peak_rss_mb

    torch.manual_seed(0)
    model, param_init = deferred_transformer(model_cfg(size, seq), seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    hm = host_memory_gb if host_memory_gb == "auto" else float(host_memory_gb)
    strategy = {"zero": 3, "micro_batch_size": 1,
                "offload": {"optimizer": "nvme", "params": "nvme", "nvme_dir": nvme_dir,
                            "step": mode, "host_memory_gb": hm}}
    # the peers' optimizer (bench/offload_peers.py); clipping needs the sync or delayed step
    optim = OptimizerConfig(lr=1e-4, weight_decay=0.01, warmup_steps=0, schedule="constant",
                            grad_clip=0.0 if mode == "overlap" else 1.0, state_dtype=state_dtype)
    t0 = time.perf_counter()
    engine = Engine(model, strategy=strategy, global_batch_size=1, param_init=param_init,
                    optim_cfg=optim, total_steps=steps)
    init_s = time.perf_counter() - t0
    io = engine.tier.store.io
    phases: list = []
    _timed_optimizer_phase(engine, io, phases)
    fwd_end: list = []  # (time, bytes read) when the forward pass returns
    engine.model.register_forward_hook(lambda *_: fwd_end.append((time.perf_counter(), io.bytes_read)))
    tokens = torch.randint(0, 32000, (1, seq + 1), generator=torch.Generator().manual_seed(0))
    rows = []
    for _ in range(steps):
        r0, w0, t = io.bytes_read, io.bytes_written, time.perf_counter()
        loss = engine.train_step((tokens[:, :-1], tokens[:, 1:]))
        opt_s, opt_r, opt_w = phases[-1]
        rows.append({"loss": loss, "step_s": time.perf_counter() - t,
                     "fwd_s": fwd_end[-1][0] - t, "fwd_read_bytes": fwd_end[-1][1] - r0,
                     "read_bytes": io.bytes_read - r0, "written_bytes": io.bytes_written - w0,
                     "opt_s": opt_s, "opt_read_bytes": opt_r, "opt_written_bytes": opt_w})
    disk = engine.tier.store.disk_bytes
    placement = engine.tier.summary()
    engine.close()
    return {"params": n_params, "init_s": init_s, "steps": rows, "disk_bytes": disk,
            "peak_rss_mb": peak_rss_mb(), "placement": placement}


def predicted(size, args, bw: dict | None = None) -> dict:
    """The cost model's view of this run (tetrad.strategy): placement bytes per tier and, with
    a machine spec (``--spec``), the predicted step time and its parts -- at the disk bandwidth
    measured in this run (``bw``), which moves from run to run here."""
    from tetrad.config.schema import Config, StrategyConfig
    from tetrad.models.args import ModelArgs
    from tetrad.strategy.offload_cost import placement
    from tetrad.strategy.shapes import rank_params
    from tetrad.strategy.timing import step_time

    cfg = Config()
    cfg.model = cfg.model.__class__(**{k: v for k, v in model_cfg(size, args.seq).items()})
    args_m = ModelArgs.from_config(cfg.model)
    hm = args.host_memory_gb if args.host_memory_gb == "auto" else float(args.host_memory_gb)
    s = StrategyConfig(zero=3, micro_batch_size=1)
    s.offload = s.offload.__class__(optimizer="nvme", params="nvme", nvme_dir=args.nvme_dir, step=args.mode,
                                    host_memory_gb=hm)
    costs = _costs(args, cfg, bw)
    mem = placement(s, costs, rank_params(args_m, s), "fp32", args.state_dtype, 1)
    out = {"host_bytes": mem["host"], "disk_bytes": mem["disk"]}
    if args.spec:
        t = step_time(args_m, s, costs, 1, 1, "fp32", args.state_dtype)
        out.update(predicted_s=t["total"], predicted_parts={k: round(v, 2) for k, v in t.items()})
    return out


def _costs(args, cfg, bw: dict | None = None):
    """SpecCosts of ``--spec`` (this machine, from ``tetrad profile --spec-out``), or a stand-in
    with this machine's memory and no time model (placement bytes only); either way the host
    memory is what is available now, as the run's ``auto`` will find it."""
    from tetrad.models.args import ModelArgs
    from tetrad.strategy.hardware import load_hardware
    from tetrad.strategy.spec_costs import SpecCosts

    import dataclasses

    from tetrad.offload.budget import GIB, _meminfo

    available = float(_meminfo().get("MemAvailable", 0))  # what the run's `auto` starts from
    if args.spec:
        from tetrad.strategy.efficiency import GemmCurve

        spec = dataclasses.replace(load_hardware(args.spec), host_memory_gb=available / GIB)
        if bw:
            spec = dataclasses.replace(spec, disk_read_GBps=bw["dd_read_MBps"] / 1e3,
                                       disk_write_GBps=bw["dd_write_MBps"] / 1e3)
        rates = (bw or {}).get("rates")
        if rates:  # this run's machine: the rates measured at the model's shapes just before it
            eff = dataclasses.replace(spec.efficiency, gemm=GemmCurve(top=1.0, half_dim=1.0), memory_top=1.0)
            spec = dataclasses.replace(spec, peak_tflops={"fp32": rates["gemm_flops"] / 1e12}, efficiency=eff,
                                       memory_bandwidth_GBps=rates["copy_Bps"] / 1e9,
                                       cpu_adam_s_per_param=rates["adam_s_per_param"])
        return SpecCosts(spec, ModelArgs.from_config(cfg.model), "fp32")
    import types

    # placement bytes only: the cost model takes the tier's working set off (budget.working_bytes)
    return types.SimpleNamespace(host_budget=available, args=ModelArgs.from_config(cfg.model))


def _label(size) -> str:
    return str(size)


def machine_rates(size, seq: int) -> dict:
    """This machine's rates now, at the model's shapes (the machine is shared: they move with
    the load): fp32 GEMM of ``seq`` tokens through a d x d and a d x 4d weight, torch's fused
    AdamW on one 16 MiB piece, an fp32 copy. Medians of 5."""
    import statistics

    import torch

    d = model_cfg(size, seq)["d_model"]

    def timed(fn) -> float:
        fn()
        out = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return statistics.median(out)

    x, w, w4 = torch.randn(seq, d), torch.randn(d, d), torch.randn(d, 4 * d)
    gemm = 2 * seq * d * 5 * d / timed(lambda: (x @ w, x @ w4))
    p = torch.nn.Parameter(torch.randn(4 * 2**20))
    p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW([p], lr=1e-4, fused=True)
    adam = timed(opt.step) / p.numel()
    a, b = torch.empty(16 * 2**20), torch.randn(16 * 2**20)
    copy = 2 * 4 * a.numel() / timed(lambda: a.copy_(b))
    return {"gemm_flops": gemm, "adam_s_per_param": adam, "copy_Bps": copy}


def run_size(size, args, bw: dict) -> dict | None:
    cmd = [sys.executable, __file__, "--child", _label(size), "--nvme-dir", args.nvme_dir,
           "--steps", str(args.steps), "--seq", str(args.seq), "--mode", args.mode,
           "--host-memory-gb", str(args.host_memory_gb), "--state-dtype", args.state_dtype]
    load0 = os.getloadavg()
    bw = {**bw, "rates": machine_rates(size, args.seq)} if args.spec else bw
    model = predicted(size, args, bw)
    model["rates"] = bw.get("rates")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        print(json.dumps({"size_b": size, "failed": proc.stderr.strip().splitlines()[-1:]}), flush=True)
        return None
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    last = got["steps"][-1]
    read_bw, write_bw = bw["dd_read_MBps"] * 1e6, bw["dd_write_MBps"] * 1e6
    io_bound = last["read_bytes"] / read_bw + last["written_bytes"] / write_bw
    opt_bound = last["opt_read_bytes"] / read_bw + last["opt_written_bytes"] / write_bw
    step_s = last["step_s"]
    row = {"size_b": size, "mode": args.mode, "host_memory_gb": args.host_memory_gb,
           "state_dtype": args.state_dtype,
           **{k: got[k] for k in ("params", "peak_rss_mb", "disk_bytes", "init_s", "placement")},
           "step_s": [round(s["step_s"], 2) for s in got["steps"]],
           "read_GB_per_step": last["read_bytes"] / 1e9, "written_GB_per_step": last["written_bytes"] / 1e9,
           "read_MBps": last["read_bytes"] / last["step_s"] / 1e6,
           "write_MBps": last["written_bytes"] / last["step_s"] / 1e6,
           "io_bound_s": io_bound, "disk_fraction": io_bound / last["step_s"],
           "fwd_s": last["fwd_s"], "fwd_read_MBps": last["fwd_read_bytes"] / last["fwd_s"] / 1e6,
           "opt_phase_s": last["opt_s"], "opt_phase_disk_fraction": opt_bound / max(last["opt_s"], 1e-9),
           "disk_share": io_bound / step_s,
           "read_bw_fraction": last["read_bytes"] / step_s / read_bw,
           "write_bw_fraction": last["written_bytes"] / step_s / write_bw,
           "losses": [s["loss"] for s in got["steps"]],
           "model": model, "loadavg_start": [round(v, 1) for v in load0],
           "loadavg_end": [round(v, 1) for v in os.getloadavg()]}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nvme-dir", required=True)
    ap.add_argument("--sizes", default="0.5,1,2,4",
                    help="billions of parameters, from " + str(list(SIZES)) + ", or 8b (Llama-3-8B's shape)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--io-only", action="store_true")
    ap.add_argument("--aio", action="store_true", help="compare with DeepSpeed's libaio op, then stop")
    ap.add_argument("--mode", choices=["sync", "overlap", "delayed"], default="sync",
                    help="strategy.offload.step (overlap: buckets stepped during backward)")
    ap.add_argument("--host-memory-gb", default="0", help="strategy.offload.host_memory_gb: GiB or auto")
    ap.add_argument("--state-dtype", choices=["fp32", "bf16"], default="fp32", help="optimizer.state_dtype")
    ap.add_argument("--spec", help="this machine's spec (tetrad profile --spec-out) for predicted_s")
    ap.add_argument("--stream", action="store_true",
                    help="the optimizer phase alone (StateSwapper + fused AdamW), then stop")
    ap.add_argument("--adam", action="store_true",
                    help="torch fused AdamW vs DeepSpeedCPUAdam on one piece, then stop")
    ap.add_argument("--child")
    args = ap.parse_args()
    os.makedirs(args.nvme_dir, exist_ok=True)
    if args.child is not None:
        size = args.child if args.child == "8b" else float(args.child)
        print(json.dumps(child(size, args.nvme_dir, args.steps, args.seq, args.mode, args.host_memory_gb,
                               args.state_dtype)))
        return
    if args.aio:
        print(json.dumps({"aio": compare_aio(args.nvme_dir)}), flush=True)
        return
    if args.adam:
        print(json.dumps({"adam": compare_adam(), "threads": os.environ.get("OMP_NUM_THREADS")}), flush=True)
        return
    bw = disk_bandwidth(args.nvme_dir)
    print(json.dumps({"disk": bw}), flush=True)
    if args.io_only:
        return
    if args.stream:
        for ahead in (1, 2):
            r = stream_bandwidth(args.nvme_dir, ahead=ahead)
            bound = r["read_bytes"] / (bw["dd_read_MBps"] * 1e6) + r["written_bytes"] / (bw["dd_write_MBps"] * 1e6)
            print(json.dumps({"stream": r, "disk_fraction": bound / r["seconds"]}), flush=True)
        return
    for size in [s if s == "8b" else float(s) for s in args.sizes.split(",")]:
        fits = fitting(size, args)
        if fits is None:
            continue
        if run_size(fits, args, bw) is None:
            break


def fitting(size, args):
    """``size``, or the largest smaller rung whose files fit the free disk (+10%), said so."""
    ladder = [size] + sorted((s for s in SIZES if size == "8b" or s < size), reverse=True)
    free = shutil.disk_usage(args.nvme_dir).free
    for s in ladder:
        need = predicted(s, args)["disk_bytes"] * 1.1
        if need <= free:
            if s != size:
                print(json.dumps({"size_b": size, "scaled_down_to": s, "why": f"needs ~{need / 1e9:.0f} GB "
                                  f"of disk at {size}, {free / 1e9:.0f} GB free"}), flush=True)
            return s
    print(json.dumps({"size_b": size, "skipped": f"no rung fits {free / 1e9:.0f} GB free"}), flush=True)
    return None


if __name__ == "__main__":
    main()
