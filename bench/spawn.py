"""One spawned process per rank on this machine, for the benchmarks (tests have
``tests/harness.py``, which also reports a failing rank's traceback; a benchmark wants only
the numbers): ``target(rank, port, *args, queue)`` puts ``(rank, ...)`` on the queue when done.
"""

from __future__ import annotations

import multiprocessing as mp


def spawn_ranks(target, world: int, *args, timeout: float = 1800) -> list[tuple]:
    """Run ``target`` on ``world`` ranks; what each put on the queue, in rank order."""
    from tetrad.parallel.launch import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=target, args=(r, port, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=timeout) for _ in procs)
    for p in procs:
        p.join(60)
    return results
