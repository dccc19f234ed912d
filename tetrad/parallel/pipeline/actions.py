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
