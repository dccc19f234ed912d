"""Latency and bandwidth of each collective, measured on real process groups and fitted to
t(n) = alpha + beta * n (the alpha-beta, or Hockney, model).

n is always the bytes of the *full* buffer a rank passes: the tensor all-reduced, the
gathered output of an all-gather, the input of a reduce-scatter, a rank's whole all-to-all
buffer, one send. Every group of a partition runs at once, as the tp (or dp) groups of a
real step do, so contention between groups is part of the measurement. Every rank calls
every function here in the same order (group creation is collective).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send_recv")


def partitions(world: int, local_world: int) -> list[tuple[int, int, str]]:
    """(group size, rank stride, placement) for each group size the world allows: contiguous
    ranks ("intra": one node when they fit in one), and, across nodes, ranks a node apart."""
    out = []
    for g in range(2, world + 1):
        if world % g:
            continue
        out.append((g, 1, "intra" if g <= local_world else "inter"))
        if local_world < world and world % (g * local_world) == 0 and local_world > 1:
            out.append((g, local_world, "inter"))
    return out


def make_groups(world: int, g: int, stride: int) -> tuple[object, list[int]]:
    """Create every group of the partition (all ranks take part); return this rank's group."""
    rank, mine, members = dist.get_rank(), None, None
    block = g * stride
    for base in range(0, world, block):
        for offset in range(stride):
            ranks = [base + offset + i * stride for i in range(g)]
            group = dist.new_group(ranks)
            if rank in ranks:
                mine, members = group, ranks
    return mine, members


def _op(kind: str, group, members: list[int], nbytes: int, device):
    """A zero-argument callable doing one `kind` of `nbytes` on `group`."""
    g = len(members)
    numel = max(g, nbytes // 4 // g * g)
    full = torch.ones(numel, device=device)
    part = torch.empty(numel // g, device=device)
    out = torch.empty_like(full)
    if kind == "all_reduce":
        return lambda: dist.all_reduce(full, group=group)
    if kind == "all_gather":
        return lambda: dist.all_gather_into_tensor(full, part, group=group)
    if kind == "reduce_scatter":
        return lambda: dist.reduce_scatter_tensor(part, full, group=group)
    if kind == "all_to_all":
        return lambda: dist.all_to_all_single(out, full, group=group)
    return _ping_pong(members, full)


def _ping_pong(members: list[int], buf: torch.Tensor):
    """A send/recv round trip between pairs of the group; timed as half the round trip."""
    me = members.index(dist.get_rank())
    peer = members[me ^ 1] if (me ^ 1) < len(members) else None

    def run():
        if peer is None:
            return
        if me % 2 == 0:
            dist.send(buf, peer)
            dist.recv(buf, peer)
        else:
            dist.recv(buf, peer)
            dist.send(buf, peer)
    return run


MIN_SAMPLE_S = 0.04
MAX_REPEAT = 64


def _time(fn, reps: int, device) -> float:
    """Median over ``reps`` samples of the mean time of one call, each sample ``k`` back-to-back
    calls started together at a barrier, after one warm-up call.

    ``k`` is the same on every rank (a collective must be called equally often everywhere):
    enough calls for a sample of about MIN_SAMPLE_S by the slowest rank's warm-up call. On
    cores shared by more ranks than they hold, one call's time is mostly whether a peer had
    its scheduler slice when the data arrived; the mean over a sample measures the rate a
    step sees. Back-to-back calls are still synchronous, so the latency (alpha) stays in.
    """
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    if device.type != "cpu":
        torch.accelerator.synchronize(device)
    first = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
    dist.all_reduce(first, op=dist.ReduceOp.MAX)
    k = int(min(MAX_REPEAT, max(1, MIN_SAMPLE_S // max(float(first), 1e-6))))
    times = []
    for _ in range(max(1, reps)):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        if device.type != "cpu":
            torch.accelerator.synchronize(device)
        times.append((time.perf_counter() - t0) / k)
    return statistics.median(times)


def fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares (alpha, beta) of t = alpha + beta * n, clamped to be non-negative."""
    n = [float(p[0]) for p in points]
    t = [float(p[1]) for p in points]
    mn, mt = statistics.fmean(n), statistics.fmean(t)
    var = sum((x - mn) ** 2 for x in n)
    beta = sum((x - mn) * (y - mt) for x, y in zip(n, t)) / var if var else 0.0
    beta = max(beta, 0.0)
    alpha = max(mt - beta * mn, 0.0)
    return alpha, beta


def reduce_floats(values: list[float], op, device) -> list[float]:
    """``values`` reduced over the world with ``op``, through a tensor on ``device``: the
    process group's backend follows the device (NCCL reduces device tensors only)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t.tolist()


def _busy_kernel(device):
    """The compute a rank does between two collectives of a step, for the measurement: one
    projection pair of a small layer (512 tokens x 128 -> 512 -> 128, ~1-2 ms on one core)."""
    x = torch.randn(512, 128, device=device)
    w1, w2 = torch.randn(128, 512, device=device), torch.randn(512, 128, device=device)
    return lambda: (x @ w1) @ w2


def _worst(seconds: float, device) -> float:
    return reduce_floats([seconds], dist.ReduceOp.MAX, device)[0]


def measure_partition(kind: str, g: int, stride: int, sizes: list[int], reps: int, device) -> dict:
    """Fit one collective on one partition; the time is the slowest rank's median.

    On a CPU a collective is timed between computations, as a step runs it: each call follows
    a fixed compute kernel (``_busy_kernel``) and the kernel's own time (measured the same way)
    is subtracted. When ranks time-share cores, a rank that reaches the collective waits for
    peers that the scheduler has paused in the middle of their compute, and the collective's
    copies and reductions compete with the other ranks' compute: neither shows when the
    collective runs back to back on idle ranks (kept as ``idle_points``). On an accelerator the
    collective runs on its own engines and is timed alone.
    """
    world = dist.get_world_size()
    group, members = make_groups(world, g, stride)
    points, idle = [], []
    busy = _busy_kernel(device) if device.type == "cpu" else None
    base = _worst(_time(busy, reps, device), device) if busy is not None else 0.0
    for nbytes in sizes:
        op = _op(kind, group, members, nbytes, device)
        alone = _worst(_time(op, reps, device), device)
        idle.append((nbytes, alone))
        if busy is not None:

            def both(op=op):
                busy()
                op()
            alone = max(alone, _worst(_time(both, reps, device), device) - base)
        points.append((nbytes, alone))
    alpha, beta = fit(points)
    return {"alpha_s": alpha, "beta_s_per_byte": beta, "points": points, "idle_points": idle}


def measure_overlap(device, nbytes: int = 1 << 22, reps: int = 3) -> float:
    """Fraction of an all-reduce hidden behind concurrent compute on this machine, in [0, 1].

    Data parallelism overlaps gradient all-reduces with backward; how much of that really
    hides depends on the machine (on a CPU the collective's threads compete with compute for
    cores). Measured: compute alone C, all-reduce alone M, both together B; hidden = (C+M-B)/min(C,M).
    """
    if dist.get_world_size() == 1:
        return 1.0
    buf = torch.ones(nbytes // 4, device=device)
    a = torch.randn(256, 256, device=device)

    def compute():
        for _ in range(8):
            a @ a
    c = _time(compute, reps, device)
    m = _time(lambda: dist.all_reduce(buf), reps, device)

    def both():
        work = dist.all_reduce(buf, async_op=True)
        compute()
        work.wait()
    b = _time(both, reps, device)
    hidden = (c + m - b) / max(min(c, m), 1e-9)
    return reduce_floats([min(max(hidden, 0.0), 1.0)], dist.ReduceOp.MIN, device)[0]


def measure_all(sizes: list[int], reps: int, device, local_world: int) -> dict:
    """{kind: {"g<size>/<placement>/s<stride>": fit}} for every partition and collective."""
    world = dist.get_world_size()
    out: dict[str, dict] = {k: {} for k in KINDS}
    for g, stride, placement in partitions(world, local_world):
        for kind in KINDS:
            if kind == "send_recv" and g != 2:
                continue  # p2p is between two ranks; one pairing per placement suffices
            out[kind][f"{g}/{placement}"] = measure_partition(kind, g, stride, sizes, reps, device)
    return out
