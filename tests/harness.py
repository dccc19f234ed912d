"""Run a function on N real gloo ranks on this machine (the multi-process test harness).

The rendezvous store is created here with port 0, so the port is found, not guessed, and
cannot be taken by another test between finding and binding. Ranks are forked from a
forkserver that has imported torch and tetrad once, so each spawn costs a fork rather than
a fresh interpreter. A rank that raises fails the test with its traceback; ranks that do
not finish within ``timeout`` are killed and the test fails naming them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable

import torch.distributed as dist

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["torch", "torch.distributed", "tetrad.trainer.trainer"])


def _worker(fn: Callable, rank: int, world: int, port: int, results, args: tuple, env: dict) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", **env})
    import torch

    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=_timedelta(60))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                                timeout=_timedelta(120))
        out = fn(rank, world, *args)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _timedelta(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 240.0,
                    env: dict | None = None) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return their results by rank."""
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    results = _CTX.Queue()
    procs = [_CTX.Process(target=_worker, args=(fn, r, world_size, store.port, results, args, env or {}),
                          daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    try:
        return _collect(procs, results, world_size, timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        del store


ERROR_GRACE_S = 30.0  # after a rank fails, how long the others get to finish what they do


def _collect(procs, results, world_size: int, timeout: float) -> list[Any]:
    """Every rank's result. A failing rank's error is raised once the other ranks have
    reported too (or exited, or ERROR_GRACE_S passed): killing them at once would cut short
    what they were still writing (their last metrics line, a checkpoint), which tests of
    failures then check."""
    deadline = time.monotonic() + timeout
    outs: dict[int, Any] = {}
    errors: list[tuple[int, str]] = []
    while len(outs) + len(errors) < world_size:
        if errors:
            deadline = min(deadline, errors[0][2] + ERROR_GRACE_S)
        try:
            rank, status, value = results.get(timeout=1.0)
        except queue.Empty:
            reported = set(outs) | {r for r, *_ in errors}
            if errors and all(not p.is_alive() for r, p in enumerate(procs) if r not in reported):
                break  # everyone else is gone: nothing more will come
            if time.monotonic() > deadline:
                if errors:
                    break
                missing = sorted(set(range(world_size)) - set(outs))
                raise TimeoutError(f"ranks {missing} did not finish within {timeout:.0f}s (hung?)")
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode and r not in reported]
            if dead and not errors:
                raise RuntimeError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
            continue
        if status == "error":
            errors.append((rank, value, time.monotonic()))
            continue
        outs[rank] = value
    if errors:
        rank, value, _ = errors[0]
        raise RuntimeError(f"rank {rank} failed:\n{value}")
    return [outs[r] for r in range(world_size)]
