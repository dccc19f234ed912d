"""Run schedules on a cost model, without processes: deadlock checks, bubbles, ZB-H1 placement.

The executor blocks on a receive right before the action that needs it and never blocks on
a send, so a schedule's completion does not depend on timing (a Kahn process network): if
the simulation finishes, so does the real run, whatever the real costs.
"""

from __future__ import annotations

from collections import deque

from tetrad.parallel.pipeline.actions import Action, Schedule

Costs = tuple[float, float, float]  # T_F, T_B, T_W of one chunk; B includes W when not split
Timeline = list[list[tuple[Action, float, float]]]


def dependency(a: Action, rank: int, p: int, n_chunks: int) -> tuple[int, Action] | None:
    """(rank, action) on another rank whose result ``a`` receives, or None."""
    c = a.chunk * p + rank
    if a.kind == "F" and c > 0:
        return (c - 1) % p, Action("F", a.mb, (c - 1) // p)
    if a.kind == "B" and c < n_chunks - 1:
        return (c + 1) % p, Action("B", a.mb, (c + 1) // p)
    return None


def _split(schedule: Schedule) -> bool:
    return any(a.kind == "W" for acts in schedule for a in acts)


def _cost(a: Action, costs: Costs, split: bool) -> float:
    tf, tb, tw = costs
    return {"F": tf, "B": tb if split else tb + tw, "W": tw}[a.kind]


def simulate(schedule: Schedule, costs: Costs = (1.0, 2.0, 0.0), comm: float = 0.0) -> Timeline:
    """Start and end of every action; raises RuntimeError naming the stuck ranks on deadlock."""
    p = len(schedule)
    n_chunks = p * (1 + max(a.chunk for acts in schedule for a in acts))
    split = _split(schedule)
    done: dict[tuple[int, Action], float] = {}
    free, ptr = [0.0] * p, [0] * p
    out: Timeline = [[] for _ in range(p)]
    progress = True
    while progress:
        progress = False
        for r in range(p):
            while ptr[r] < len(schedule[r]):
                a = schedule[r][ptr[r]]
                dep = dependency(a, r, p, n_chunks)
                if dep is not None and dep not in done:
                    break
                start = max(free[r], done[dep] + comm if dep else 0.0)
                free[r] = start + _cost(a, costs, split)
                done[(r, a)] = free[r]
                out[r].append((a, start, free[r]))
                ptr[r] += 1
                progress = True
    stuck = [r for r in range(p) if ptr[r] < len(schedule[r])]
    if stuck:
        raise RuntimeError(f"schedule deadlocks: ranks {stuck} wait at "
                           f"{[str(schedule[r][ptr[r]]) for r in stuck]}")
    return out


def bubble(timeline: Timeline) -> list[float]:
    """Per rank, the fraction of the step (first start to last end, over all ranks) spent idle."""
    span = max(e for acts in timeline for _, _, e in acts)
    return [1.0 - sum(e - s for _, s, e in acts) / span for acts in timeline]


def theoretical_bubble(name: str, p: int, m: int, v: int = 1, costs: Costs = (1.0, 2.0, 0.0)) -> float:
    """The papers' bubble as a fraction of the step: idle / (idle + m·(T_F+T_B+T_W))."""
    tf, tb, tw = costs
    work = m * (tf + tb + tw)
    idle = {"gpipe": (p - 1) * (tf + tb + tw), "1f1b": (p - 1) * (tf + tb + tw),
            "interleaved": (p - 1) * (tf + tb + tw) / v,
            "zero_bubble": (p - 1) * max(tf + tb - tw, 0.0)}[name]
    return idle / (idle + work)


def list_schedule(base: Schedule, p: int, costs: Costs) -> Schedule:
    """Split every B of ``base`` into B then W and place the W passes greedily (see
    ``schedule.zero_bubble_h1``); the F/B order of each rank is kept."""
    n_chunks = p * (1 + max(a.chunk for acts in base for a in acts))
    state = [_RankState(r, p, acts) for r, acts in enumerate(base)]
    done: dict[tuple[int, Action], float] = {}
    while any(not s.finished for s in state):
        live = sorted((s for s in state if not s.finished), key=lambda s: (s.free, s.rank))
        if any(s.advance(done, n_chunks, costs) for s in live):
            continue
        now = live[0].free  # nobody can start: move the waiting clocks to the next event
        later = [t for t in done.values() if t > now] + [s.free for s in live if s.free > now]
        if not later:
            raise RuntimeError(f"zero-bubble placement deadlocked on ranks {[s.rank for s in live]}")
        for s in live:
            s.free = max(s.free, min(later))
    return [s.out for s in state]


class _RankState:
    """One rank during list scheduling: its F/B queue, pending W passes, and clock."""

    def __init__(self, rank: int, p: int, acts: list[Action]):
        self.rank, self.cap = rank, p - rank  # 1F1B's activation memory on this rank
        self.queue, self.pending = deque(acts), deque()
        self.free, self.held, self.out = 0.0, 0, []

    @property
    def finished(self) -> bool:
        return not self.queue and not self.pending

    def _run(self, a: Action, start: float, cost: float, done) -> None:
        self.free = start + cost
        done[(self.rank, a)] = self.free
        self.out.append(a)

    def advance(self, done, n_chunks: int, costs: Costs) -> bool:
        """Run one action at ``self.free`` if any can start then; False when it must wait."""
        tf, tb, tw = costs
        if self.queue:
            a = self.queue[0]
            dep = dependency(a, self.rank, self.cap + self.rank, n_chunks)
            ready = dep is None or done.get(dep, float("inf")) <= self.free
            if ready and (a.kind == "B" or self.held < self.cap):
                self.queue.popleft()
                self._run(a, self.free, tf if a.kind == "F" else tb, done)
                if a.kind == "F":
                    self.held += 1
                else:
                    self.held -= 1
                    self.pending.append(Action("W", a.mb, a.chunk))
                return True
        if self.pending:
            self._run(self.pending.popleft(), self.free, tw, done)
            return True
        return False
