"""Single-process mode: start N local gloo ranks, run a function on each, return rank 0's result.

Used when `tetrad profile` / `tetrad plan` run as a plain process but the world to measure
has more than one rank. The rendezvous store binds port 0, so the port is found, never guessed.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable

import torch.distributed as dist


def _worker(fn: Callable, rank: int, world: int, port: int, results, args: tuple, threads: int) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(threads)})
    import torch

    torch.set_num_threads(threads)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=60))
        dist.init_process_group(_backend(rank, world), store=store, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=300))
        out = fn(*args)
        results.put((rank, "ok", out if rank == 0 else None))
    except BaseException:  # noqa: BLE001 - the parent re-raises with the traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _backend(rank: int, world: int) -> str:
    """One accelerator per spawned rank where the machine has enough of them (the backend
    follows the device, NCCL on CUDA); otherwise every rank measures the CPU on gloo, since NCCL
    refuses two ranks on one GPU and gloo on CUDA tensors would measure neither."""
    import torch

    from tetrad.compat import default_backend

    if torch.accelerator.is_available() and torch.accelerator.device_count() >= world \
            and os.environ.get("TETRAD_DEVICE", "") != "cpu":
        torch.accelerator.set_device_index(rank)
        return default_backend(torch.accelerator.current_accelerator())
    os.environ["TETRAD_DEVICE"] = "cpu"
    return "gloo"


def run_local(fn: Callable, world: int, *args: Any, timeout: float = 600.0) -> Any:
    """``fn(*args)`` on ``world`` fresh local ranks (one thread each when they oversubscribe
    the cores, as training would run them); returns rank 0's return value."""
    ctx = mp.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // world)
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(fn, r, world, store.port, results, args, threads), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        out, done, deadline = None, 0, time.monotonic() + timeout
        while done < world:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"profiling rank {dead[0]} died (exit code {procs[dead[0]].exitcode})")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"profiling ranks did not finish within {timeout:.0f}s") from None
                continue
            if status == "error":
                raise RuntimeError(f"profiling rank {rank} failed:\n{value}")
            out = value if rank == 0 else out
            done += 1
        return out
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
        del store
