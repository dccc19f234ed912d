"""NCCL's completion rule, applied to the p2p batches the executor issues for a schedule.

gloo completes each send and receive on its own and matches them by tag, so any schedule
that the plain simulator (``simulate``) finishes also finishes on gloo. NCCL does not:

* the ops of one ``batch_isend_irecv`` form one group, which completes only when *all* of its
  sends and receives have completed;
* the groups of one communicator run in issue order on its stream (one after another);
* sends and receives between two ranks match in FIFO order per communicator (tags are
  ignored), and an op completes once its peer's group containing the matching op has started;
* the CPU never blocks: a wait only orders the compute stream after the group. So the only
  real dependencies are stream order, data (a send carries what an action computed) and the
  receive an action's compute consumes.

``nccl_check(schedule, placement=...)`` replays the executor's exact batching (see
``executor_batches``; chunks where the schedule's placement puts them, ZB-V's V included)
under these rules and raises naming the stuck ranks if the run would hang. The executor puts
activations and activation gradients on two communicators of the same pp ranks
(``CHANNELS``): on one, interleaved 1F1B hangs whenever micro-batches outnumber stages (the
two directions' groups wait on each other); split by direction, every schedule tetrad
builds completes (``tests/test_pipeline_nccl.py``: p <= 8, m <= 16).
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

from tetrad.parallel.pipeline.actions import Action, Placement, Schedule

ACT, GRAD = 0, 1
CHANNELS = ("one", "by_kind", "by_pair")


@dataclass
class Op:
    send: bool
    peer: int
    kind: int
    chunk: int  # the sending global chunk
    mb: int


@dataclass
class Batch:
    comm: int
    ops: list[Op]
    after: int            # index of the compute whose outputs the sends carry (-1: none)
    feeds: int | None     # index of the compute that consumes its receive (None: sends only)
    started: bool = False
    left: int = field(default=0)


def _needs(a: Action, c: int, n_chunks: int) -> tuple[int, int] | None:
    """(kind, sending global chunk) of what action ``a`` of global chunk ``c`` receives."""
    if a.kind == "F" and c > 0:
        return ACT, c - 1
    if a.kind == "B" and c < n_chunks - 1:
        return GRAD, c + 1
    return None


def _sends(a: Action, c: int, n_chunks: int) -> list[tuple[int, int]]:
    """(kind, receiving global chunk) of what action ``a`` sends."""
    if a.kind == "F" and c < n_chunks - 1:
        return [(ACT, c + 1)]
    if a.kind == "B" and c > 0:
        return [(GRAD, c - 1)]
    return []


def executor_batches(acts: list[Action], rank: int, p: int, n_chunks: int, channels: str,
                     placement: Placement | None = None) -> list[Batch]:
    """One rank's batches in issue order, exactly as ``PipelineExecutor.run`` posts them: the
    sends an action produced go out together with the receive the next action needs, one
    ``batch_isend_irecv`` per communicator; without a receive to pair with they are flushed.
    ``placement`` says which rank holds which chunk (default: round-robin); a transfer between
    two chunks of one rank (ZB-V's turn) is a hand-over in memory, no op."""
    place = placement or Placement(p, n_chunks // p)
    chan = _channel(channels, rank)

    def remote(a: Action):
        c = place.global_of(rank, a.chunk)
        need = _needs(a, c, n_chunks)
        need = need if need is not None and place.rank_of(need[1]) != rank else None
        sends = [(k, d) for k, d in _sends(a, c, n_chunks) if place.rank_of(d) != rank]
        return c, need, sends

    out: list[Batch] = []
    outbox: list[Op] = []
    produced_by = -1
    for i, a in enumerate(acts):
        c, need, sends = remote(a)
        if need is not None:
            kind, src = need
            recv = Op(False, place.rank_of(src), kind, src, a.mb)
            out += _post(outbox, chan, produced_by, i, recv)
            outbox = []
        for kind, dst in sends:
            outbox.append(Op(True, place.rank_of(dst), kind, c, a.mb))
        produced_by = i
        nxt = acts[i + 1] if i + 1 < len(acts) else None
        if nxt is None or remote(nxt)[1] is None:
            out += _post(outbox, chan, produced_by, None, None)
            outbox = []
    return out


def _channel(channels: str, rank: int):
    """op -> the communicator it goes on: one for all; one per direction (ACT / GRAD); or one
    per ordered (sender, receiver) pair of ranks."""
    if channels == "one":
        return lambda op: 0
    if channels == "by_kind":
        return lambda op: op.kind
    return lambda op: (rank, op.peer) if op.send else (op.peer, rank)


def _post(outbox: list[Op], chan, after: int, feeds: int | None, recv: Op | None) -> list[Batch]:
    by_comm: dict = defaultdict(list)
    for op in outbox:
        by_comm[chan(op)].append(op)
    if recv is not None:
        by_comm[chan(recv)].append(recv)
    return [Batch(comm, ops, after, feeds if recv is not None and chan(recv) == comm else None)
            for comm, ops in by_comm.items()]


def nccl_check(schedule: Schedule, channels: str = "by_pair", placement: Placement | None = None) -> None:
    """Raise RuntimeError if the executor's p2p would hang on NCCL for this schedule, its
    chunks placed by ``placement`` (default: round-robin; ZB-V: ``schedule.placement``)."""
    p = len(schedule)
    n_chunks = p * (1 + max(a.chunk for acts in schedule for a in acts))
    ranks = [executor_batches(acts, r, p, n_chunks, channels, placement) for r, acts in enumerate(schedule)]
    _Run(schedule, ranks).finish()


class _Run:
    """The event loop: start what may start, pair what is started, complete, repeat."""

    def __init__(self, schedule: Schedule, ranks: list[list[Batch]]):
        self.schedule, self.ranks = schedule, ranks
        self.computed = [-1] * len(ranks)  # last finished compute per rank
        self.queues = [defaultdict(deque) for _ in ranks]  # per rank: comm -> batches not done
        for r, batches in enumerate(ranks):
            for b in batches:
                b.left = len(b.ops)
                self.queues[r][b.comm].append(b)
        self.waiting: dict[tuple, deque] = defaultdict(deque)  # (src, dst, comm, send?) -> ops

    def finish(self) -> None:
        while self._step():
            pass
        stuck = [r for r in range(len(self.ranks)) if self.computed[r] < len(self.schedule[r]) - 1
                 or any(self.queues[r].values())]
        if stuck:
            where = {r: [f"comm{c}:{[('send' if o.send else 'recv', o.peer, o.mb) for o in q[0].ops]}"
                         for c, q in self.queues[r].items() if q] for r in stuck}
            raise RuntimeError(f"p2p would hang on NCCL: ranks {stuck} stuck at {where}")

    def _step(self) -> bool:
        moved = False
        for r in range(len(self.ranks)):
            moved |= self._start(r) | self._compute(r)
        return moved

    def _start(self, r: int) -> bool:
        """Start the head batch of each communicator once the compute its sends carry is done."""
        moved = False
        for comm, q in self.queues[r].items():
            if q and not q[0].started and q[0].after <= self.computed[r]:
                q[0].started = moved = True
                for op in q[0].ops:
                    self._pair(r, comm, op, q[0])
        return moved

    def _pair(self, r: int, comm: int, op: Op, batch: Batch) -> None:
        src, dst = (r, op.peer) if op.send else (op.peer, r)
        other = self.waiting[(src, dst, comm, not op.send)]
        if other:
            peer_batch = other.popleft()
            for b in (batch, peer_batch):
                b.left -= 1
                if b.left == 0:
                    self._complete(b)
        else:
            self.waiting[(src, dst, comm, op.send)].append(batch)

    def _complete(self, b: Batch) -> None:
        for q in (q for rq in self.queues for q in rq.values()):
            if q and q[0] is b:
                q.popleft()
                return
        raise AssertionError("a batch completed before it was the head of its stream")

    def _compute(self, r: int) -> bool:
        """Run this rank's next computes whose receive (if any) has completed."""
        moved = False
        while self.computed[r] + 1 < len(self.schedule[r]):
            i = self.computed[r] + 1
            if any(b.feeds == i for q in self.queues[r].values() for b in q):
                break  # its receive's group has not completed
            self.computed[r] = i
            moved = True
        return moved
