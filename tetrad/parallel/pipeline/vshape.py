"""ZB-V (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", section 6): two chunks per rank in
a V, backward split into B and W, placed by list scheduling on a cost model.

Rank r holds chunks r and 2p-1-r (``Placement(p, 2, "v")``): a micro-batch's forward runs
down the ranks and back up, its backward down and back up again, so the last rank hands its
two chunks to itself and rank 0 holds both the embedding and the head. Every rank then does
the same work with the same memory, and its W passes fill what would be the bubble.

How the order is found: an event-driven list schedule (the same idea as ZB-H1's placement in
``simulate.list_schedule``). Whenever a rank is free it runs, in this order of preference, a
B whose input gradient has arrived (the critical path: the earliest micro-batch, the later
chunk first), an F whose input has arrived while it holds fewer than 2p units of activations
(1F1B's memory: the first 1F1B rank holds p micro-batches of a whole stage, 2p half-stage
chunks here), else a pending W. The result is plain data, checked like every schedule by
``simulate`` (which is what makes it safe to run: the executor blocks only on receives).
"""

from __future__ import annotations

from collections import deque

from tetrad.parallel.pipeline.actions import Action, Placement, Schedule
from tetrad.parallel.pipeline.simulate import Costs, dependency


def v_placement(p: int) -> Placement:
    return Placement(p, 2, "v")


def zero_bubble_v(p: int, m: int, costs: Costs = (1.0, 1.0, 1.0)) -> Schedule:
    """Every rank's F/B/W list for ``m`` micro-batches over the V placement of ``p`` ranks."""
    return _Greedy(v_placement(p), m, costs, cap=2 * p).run()


class _Greedy:
    def __init__(self, place: Placement, m: int, costs: Costs, cap: int):
        self.place, self.m, self.costs, self.cap = place, m, costs, cap
        p, v = place.p, place.v
        self.done: dict[tuple[int, Action], float] = {}
        self.free = [0.0] * p
        self.out: Schedule = [[] for _ in range(p)]
        self.fwd = [[0] * v for _ in range(p)]   # next micro-batch to forward, per local chunk
        self.bwd = [[0] * v for _ in range(p)]   # next micro-batch to backward, per local chunk
        self.held = [0] * p
        self.w = [deque() for _ in range(p)]

    def _ready(self, r: int, a: Action, t: float) -> bool:
        dep = dependency(a, r, self.place)
        return dep is None or self.done.get(dep, float("inf")) <= t

    def _pick(self, r: int, t: float) -> Action | None:
        v, chunks = self.place.v, range(self.place.v - 1, -1, -1)  # later chunk first
        backs = [Action("B", self.bwd[r][c], c) for c in chunks
                 if self.bwd[r][c] < self.fwd[r][c]
                 and self.done.get((r, Action("F", self.bwd[r][c], c)), float("inf")) <= t]
        backs = [a for a in backs if self._ready(r, a, t)]
        if backs:
            return min(backs, key=lambda a: a.mb)
        if self.held[r] < self.cap:
            fwds = [Action("F", self.fwd[r][c], c) for c in chunks if self.fwd[r][c] < self.m]
            fwds = [a for a in fwds if self._ready(r, a, t)]
            if fwds:
                return min(fwds, key=lambda a: (a.mb, v - a.chunk))
        return self.w[r].popleft() if self.w[r] else None

    def _commit(self, r: int, a: Action, t: float) -> None:
        tf, tb, tw = self.costs
        self.free[r] = t + {"F": tf, "B": tb, "W": tw}[a.kind]
        self.done[(r, a)] = self.free[r]
        self.out[r].append(a)
        if a.kind == "F":
            self.fwd[r][a.chunk] += 1
            self.held[r] += 1
        elif a.kind == "B":
            self.bwd[r][a.chunk] += 1
            self.held[r] -= 1
            self.w[r].append(Action("W", a.mb, a.chunk))

    def run(self) -> Schedule:
        p, total = self.place.p, 3 * self.m * self.place.v
        while True:
            live = sorted((r for r in range(p) if len(self.out[r]) < total), key=lambda x: (self.free[x], x))
            if not live:
                return self.out
            now = self.free[live[0]]
            if any(self._try(r) for r in live if self.free[r] == now):  # only the earliest clocks:
                continue  # a later one must not run ahead of results still to come
            # nobody free now can start: move the waiting clocks to the next event
            later = [e for e in self.done.values() if e > now] + [self.free[r] for r in live if self.free[r] > now]
            if not later:
                raise RuntimeError(f"ZB-V placement deadlocked on ranks {live} at t={now}")
            for r in live:
                self.free[r] = max(self.free[r], min(later))

    def _try(self, r: int) -> bool:
        a = self._pick(r, self.free[r])
        if a is not None:
            self._commit(r, a, self.free[r])
        return a is not None
