"""The pipeline IR: an ``Action`` is one F, B or W pass of a (micro-batch, chunk) unit, a
``Schedule`` is every rank's list of them, and a ``Placement`` says which rank holds which
chunk. Its own module so that the schedule generators (``schedule``) and the simulator that
places and checks them (``simulate``) both build on it without importing each other.
"""

from __future__ import annotations

from typing import NamedTuple


class Action(NamedTuple):
    kind: str   # "F" forward, "B" backward (input grads; + weight grads unless split), "W" weight grads
    mb: int     # micro-batch index within the step
    chunk: int  # local chunk index on this rank (0 .. virtual_stages-1)

    def __str__(self) -> str:
        return f"{self.kind}{self.mb}" + (f"c{self.chunk}" if self.chunk else "")


Schedule = list[list[Action]]


class Placement(NamedTuple):
    """Which rank holds which of the ``p * v`` global chunks (chunk c runs after chunk c-1).

    ``loop`` (Megatron's interleaving, breadth-first's looping): rank r holds chunks r, r+p,
    r+2p, ...; ``v`` (ZB-V, v = 2): rank r holds chunks r and 2p-1-r, so the forward runs down
    the ranks and back up, and rank 0 holds both the first and the last chunk.
    """

    p: int
    v: int = 1
    shape: str = "loop"

    @property
    def n_chunks(self) -> int:
        return self.p * self.v

    def global_of(self, rank: int, local: int) -> int:
        if self.shape == "v":
            return rank if local == 0 else 2 * self.p - 1 - rank
        return local * self.p + rank

    def rank_of(self, chunk: int) -> int:
        if self.shape == "v":
            return chunk if chunk < self.p else 2 * self.p - 1 - chunk
        return chunk % self.p

    def local_of(self, chunk: int) -> int:
        if self.shape == "v":
            return 0 if chunk < self.p else 1
        return chunk // self.p


def held_spans(actions: list[Action]) -> list[range] | None:
    """Where a rank's chunk parameters can stay resident across passes: the index ranges of
    the maximal runs of consecutive actions on one chunk, when that is worth holding, else None.

    Worth it when the rank holds more than one chunk, every chunk's passes come in at most two
    runs (its forwards, its backwards; the last chunk's two are adjacent, one run) and no W
    pass is deferred: looped breadth-first, whose runs are m passes long. A sharded
    data-parallel engine (ZeRO-3) then gathers a chunk once per run, one chunk at a time.
    Schedules that alternate chunks or micro-batches pass by pass (1F1B, interleaved, ZB) get
    None: holding across their runs would keep every chunk gathered at once (the whole
    stage), and with one chunk per rank (GPipe) a span would be the whole stage for the whole
    step -- stage 3's memory saving gone; they keep the per-pass gather.
    """
    spans: list[range] = []
    start = 0
    for i in range(1, len(actions) + 1):
        if i == len(actions) or actions[i].chunk != actions[start].chunk:
            spans.append(range(start, i))
            start = i
    chunks = [actions[r.start].chunk for r in spans]
    if (len(set(chunks)) < 2 or any(chunks.count(c) > 2 for c in set(chunks))
            or any(a.kind == "W" for a in actions)):
        return None
    return spans
