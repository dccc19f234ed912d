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


def _time(fn, reps: int, device) -> float:
    times = []
    for i in range(reps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        if device.type != "cpu":
            torch.accelerator.synchronize(device)
        if i:
            times.append(time.perf_counter() - t0)
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


def measure_partition(kind: str, g: int, stride: int, sizes: list[int], reps: int, device) -> dict:
    """Fit one collective on one partition; the time is the slowest rank's median."""
    world = dist.get_world_size()
    group, members = make_groups(world, g, stride)
    points = []
    for nbytes in sizes:
        seconds = _time(_op(kind, group, members, nbytes, device), reps, device)
        worst = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        points.append((nbytes, float(worst)))
    alpha, beta = fit(points)
    return {"alpha_s": alpha, "beta_s_per_byte": beta, "points": points}


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
    value = torch.tensor([min(max(hidden, 0.0), 1.0)], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return float(value)


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
