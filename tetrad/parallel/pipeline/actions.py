"""The pipeline IR: an ``Action`` is one F, B or W pass of a (micro-batch, chunk) unit, and a
``Schedule`` is every rank's list of them. Its own module so that the schedule generators
(``schedule``) and the simulator that places and checks them (``simulate``) both build on it
without importing each other.
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
