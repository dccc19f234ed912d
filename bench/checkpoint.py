"""Checkpoint stall and flush throughput: tetrad lazy async / sync vs torch.save, DCP, DeepSpeed.

    python bench/checkpoint.py [--d-model 768 --layers 4 --steps 12 --every 3 --dir /tmp/ckpt_bench]

One JSON line per method. ``stall_ms`` is the time the training loop is blocked per
checkpoint (the save call, plus for tetrad async the wait before the next optimizer step);
``overhead_ms`` is the extra wall time per checkpoint of the whole run against the same
steps without checkpoints (it includes background work competing for the CPU cores);
``flush_mb_s`` is bytes / time to get them on disk. The physical bound is the disk's own
write bandwidth with fsync, measured first. Single process (world 1, gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist


def _disk_bandwidth(root: Path, mb: int = 256) -> float:
    buf = os.urandom(1 << 20) * 16
    path = root / "bw.bin"
    start = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(mb // 16):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
    secs = time.perf_counter() - start
    path.unlink()
    return mb / secs


def _build(args):
    from tetrad.config.schema import OptimizerConfig
    from tetrad.models import ModelArgs, Transformer
    from tetrad.engine import Engine

    model = Transformer(ModelArgs(arch="llama", d_model=args.d_model, n_layers=args.layers, n_heads=12,
                                  vocab_size=256, seq_len=args.seq), seed=0)
    return Engine(model, strategy={"micro_batch_size": args.batch},
                  optim_cfg=OptimizerConfig(warmup_steps=0, schedule="constant"))


def _batch(args):
    x = torch.randint(0, 256, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    return x, x.roll(-1, 1)


def _state_bytes(engine) -> int:
    """Bytes of the training state one checkpoint holds (what tetrad writes)."""
    from tetrad.checkpoint.writer import total_bytes

    pieces = engine.state_pieces()
    return total_bytes([p for p in pieces if p.write])


def _loop(engine, args, save=None, finish=None) -> tuple[float, list[float]]:
    """Train args.steps steps, calling ``save(step)`` every args.every; returns (wall, save call times)."""
    batch, calls = _batch(args), []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        engine.train_step(batch)
        if save is not None and step % args.every == 0:
            t0 = time.perf_counter()
            save(step)
            calls.append(time.perf_counter() - t0)
    if finish is not None:
        finish()
    return time.perf_counter() - start, calls


def _tetrad(engine, root: Path, async_save: bool):
    from tetrad.checkpoint.manager import CheckpointManager

    pieces_of = engine.state_pieces

    mgr = CheckpointManager(root, async_save=async_save, keep=1, run_id="bench")
    hook = engine.optimizer.register_step_pre_hook(lambda *_: mgr.wait_for_snapshot())

    def save(step):
        mgr.save(step, pieces_of(), {"step": step})

    def finish():
        mgr.close()
        hook.remove()
    return save, finish, mgr


def _full_state(engine):
    return {"model": engine.model.state_dict(), "optim": engine.optimizer.state_dict()}


def run_method(name: str, engine, args, root: Path, baseline: float) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    mgr, pending = None, []
    if name in ("tetrad_async", "tetrad_sync"):
        save, finish, mgr = _tetrad(engine, root, name == "tetrad_async")
    elif name == "torch_save":
        def save(step):
            torch.save(_full_state(engine), root / f"step_{step}.pt")
        finish = None
    elif name in ("dcp_save", "dcp_async_save"):
        import torch.distributed.checkpoint as dcp

        def save(step):
            while pending:
                pending.pop().result()  # one save in flight, as DCP's docs recommend
            fn = dcp.async_save if name == "dcp_async_save" else dcp.save
            out = fn(_full_state(engine), checkpoint_id=str(root / f"step_{step}"))
            if name == "dcp_async_save":
                pending.append(out)

        def finish():
            while pending:
                pending.pop().result()
    elif name == "deepspeed":
        save, finish = _deepspeed(engine, args, root)
    wall, calls = _loop(engine, args, save, finish)
    n = len(calls)
    stalls = [s["stall_s"] for s in mgr.stats] if mgr else calls
    flush = [s["flush_s"] for s in mgr.stats] if mgr else calls
    mb = _state_bytes(engine) / 2**20
    return {"method": name, "state_mb": round(mb, 1), "checkpoints": n,
            "step_ms": round(baseline / args.steps * 1e3, 1),
            "stall_ms": round(1e3 * sum(stalls) / n, 2),
            "stall_pct_of_step": round(100 * sum(stalls) / n / (baseline / args.steps), 2),
            "overhead_ms": round(1e3 * (wall - baseline) / n, 1),
            "flush_mb_s": round(mb * n / sum(flush), 1)}


def _deepspeed(engine, args, root: Path):
    import deepspeed

    ds_engine, *_ = deepspeed.initialize(model=engine.model, optimizer=engine.optimizer, config={
        "train_micro_batch_size_per_gpu": args.batch, "zero_optimization": {"stage": 0}})

    def save(step):
        ds_engine.save_checkpoint(str(root), tag=f"step_{step}")
    return save, None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=768)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=9)
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--methods", default="tetrad_async,tetrad_sync,torch_save,dcp_save,dcp_async_save,deepspeed")
    args = p.parse_args()
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": os.environ.get("MASTER_PORT", "29533")})
    base = Path(args.dir or tempfile.mkdtemp(prefix="ckpt_bench_"))
    base.mkdir(parents=True, exist_ok=True)
    print(json.dumps({"disk_write_mb_s_fsync": round(_disk_bandwidth(base), 1), "torch_threads":
                      torch.get_num_threads(), "dir": str(base)}), flush=True)
    engine = _build(args)
    _loop(engine, argparse.Namespace(**{**vars(args), "steps": 2}))  # warm up, creates optimizer state
    baseline, _ = _loop(engine, args)
    print(json.dumps({"method": "no_checkpoint", "state_mb": round(_state_bytes(engine) / 2**20, 1),
                      "step_ms": round(baseline / args.steps * 1e3, 1)}), flush=True)
    for name in args.methods.split(","):
        try:
            print(json.dumps(run_method(name, engine, args, base / name, baseline)), flush=True)
        except Exception as e:  # noqa: BLE001 - a missing peer must not hide the others' numbers
            print(json.dumps({"method": name, "error": f"{type(e).__name__}: {e}"[:300]}), flush=True)
        shutil.rmtree(base / name, ignore_errors=True)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
