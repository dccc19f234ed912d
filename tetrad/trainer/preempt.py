"""Preemption signals recorded, never acted on inside a handler.

SIGTERM (schedulers, torchrun's agent), SIGINT (Ctrl-C) and SIGUSR1 (``sbatch
--signal=USR1@T`` ahead of a time limit) only set a flag; the training loop agrees on it
across ranks at a step boundary (:meth:`Preemption.agreed`) and stops there with a
checkpoint. This module imports no torch, so ``python -m tetrad train`` installs the
handlers before the seconds-long imports, and a signal during startup or teardown is
remembered rather than killing the process without a word.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preemption:
    """Handlers that only record the first signal (repeats are ignored: a second Ctrl-C must
    not kill the checkpoint being written; SIGKILL is the hard stop)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def agreed(self, device, extra: list[int] = (), traffic=None) -> list[int]:
        """[the signal any rank received (0 if none), *MAX of ``extra``]: every rank gets the
        same answer from one all-reduce (a collective: every rank calls it at the same point),
        counted in ``traffic`` (a ``tetrad.traffic.Traffic``) when given."""
        import torch
        import torch.distributed as dist

        flag = torch.tensor([self.signum or 0, *extra], dtype=torch.int64, device=device)
        if traffic is not None:
            traffic.all_reduce(None, flag.numel() * flag.element_size())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return [int(v) for v in flag.tolist()]
