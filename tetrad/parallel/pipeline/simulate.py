"""Run schedules on a cost model, without processes: deadlock checks, bubbles, ZB-H1 placement.

The executor blocks on a receive right before the action that needs it and never blocks on
a send, so a schedule's completion does not depend on timing (a Kahn process network): if
the simulation finishes, so does the real run, whatever the real costs.
"""

from __future__ import annotations

from collections import deque

from tetrad.parallel.pipeline.actions import Action, Placement, Schedule

Costs = tuple[float, float, float]  # T_F, T_B, T_W of one chunk; B includes W when not split
Timeline = list[list[tuple[Action, float, float]]]


def loop_placement(schedule: Schedule) -> Placement:
    """The looping placement of a schedule's ranks and chunks (the default)."""
    return Placement(len(schedule), 1 + max(a.chunk for acts in schedule for a in acts))


def dependency(a: Action, rank: int, place: Placement) -> tuple[int, Action] | None:
    """(rank, action) whose result ``a`` receives (on another rank, or on this one where the
    placement puts both chunks here), or None."""
    c = place.global_of(rank, a.chunk)
    if a.kind == "F" and c > 0:
        return place.rank_of(c - 1), Action("F", a.mb, place.local_of(c - 1))
    if a.kind == "B" and c < place.n_chunks - 1:
        return place.rank_of(c + 1), Action("B", a.mb, place.local_of(c + 1))
    return None


def _split(schedule: Schedule) -> bool:
    return any(a.kind == "W" for acts in schedule for a in acts)


def _cost(a: Action, costs: Costs, split: bool) -> float:
    tf, tb, tw = costs
    return {"F": tf, "B": tb if split else tb + tw, "W": tw}[a.kind]


def simulate(schedule: Schedule, costs: Costs = (1.0, 2.0, 0.0), comm: float = 0.0,
             placement: Placement | None = None) -> Timeline:
    """Start and end of every action; raises RuntimeError naming the stuck ranks on deadlock.
    ``comm`` delays a result that crosses ranks (not one a rank hands itself)."""
    p = len(schedule)
    place = placement or loop_placement(schedule)
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
                dep = dependency(a, r, place)
                if dep is not None and dep not in done:
                    break
                delay = comm if dep is not None and dep[0] != r else 0.0
                start = max(free[r], done[dep] + delay if dep else 0.0)
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
    # ZB-V: Qi et al. give 0 for T_F = T_B = T_W (their table, the steady state): the fill and
    # drain of a finite step are what the simulator and the executor measure beyond it.
    idle = {"gpipe": (p - 1) * (tf + tb + tw), "1f1b": (p - 1) * (tf + tb + tw),
            "interleaved": (p - 1) * (tf + tb + tw) / v, "breadth_first": (p - 1) * (tf + tb + tw) / v,
            "zero_bubble": (p - 1) * max(tf + tb - tw, 0.0), "zero_bubble_v": 0.0}[name]
    return idle / (idle + work)


def list_schedule(base: Schedule, p: int, costs: Costs) -> Schedule:
    """Split every B of ``base`` into B then W and place the W passes greedily (see
    ``schedule.zero_bubble_h1``); the F/B order of each rank is kept."""
    place = loop_placement(base)
    state = [_RankState(r, p, acts) for r, acts in enumerate(base)]
    done: dict[tuple[int, Action], float] = {}
    while any(not s.finished for s in state):
        live = sorted((s for s in state if not s.finished), key=lambda s: (s.free, s.rank))
        if any(s.advance(done, place, costs) for s in live):
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

    def advance(self, done, place: Placement, costs: Costs) -> bool:
        """Run one action at ``self.free`` if any can start then; False when it must wait."""
        tf, tb, tw = costs
        if self.queue:
            a = self.queue[0]
            dep = dependency(a, self.rank, place)
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
