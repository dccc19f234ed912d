"""``OverlapStream``: the optimizer thread's side of ``strategy.offload.step: overlap``.

Backward hands over each group's reduced gradient (``arrive``) in an order that is the same
every step. From the second step on, the order of the previous step is known, so the thread
runs *one* ``StateSwapper.stream`` over every piece in that order, started when backward
starts (``start``): the masters and optimizer state of the next pieces are read while
backward is still computing the gradients that will update them, and a group boundary does
not drain the read-ahead. Each piece then waits for its group's gradient, is stepped and
published. On the first step (no order yet) each group is streamed on its own as it arrives.

Back-pressure keeps held gradients bounded: ``arrive`` waits while two or more gradients are
waiting for the thread, unless the thread itself is waiting for a group that has not arrived
(then backward must go on to produce it; waiting would deadlock).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from tetrad.device import set_thread_device

MAX_WAITING = 2  # gradients handed over but not yet consumed before backward pauses


class OverlapStream:
    def __init__(self, pieces, by_group: dict[int, list[int]], tier, keys: list[str],
                 step_piece: Callable, after_group: Callable | None, device: torch.device | None = None):
        self.pieces, self.by_group, self.tier, self.keys = pieces, by_group, tier, keys
        self.step_piece, self.after_group = step_piece, after_group
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tetrad-optim", initializer=set_thread_device,
                                          initargs=(device or torch.device("cpu"),))
        self._cv = threading.Condition()
        self._arrived: dict[int, torch.Tensor] = {}
        self._wanted: int | None = None  # the group the thread is waiting for
        self._order: list[int] | None = None
        self._seen: list[int] = []
        self._jobs: list[Future] = []
        self._abort = False
        self._finite: dict[int, bool] = {}

    def start(self) -> None:
        """The synchronising backward begins: stream in last step's order, if known."""
        self._seen = []
        if self._order is not None:
            self._jobs.append(self._thread.submit(self._stream, self._order))

    def arrive(self, gi: int, grad: torch.Tensor, finite: bool | Callable[[], bool] = True) -> None:
        """Group ``gi``'s fp32 gradient shard (kept unchanged until its pieces are stepped);
        ``finite`` False: it holds an inf or nan, so its pieces are left as they are. A callable
        is asked on the optimizer thread, before the first piece (it may wait for the copy
        that brings the gradient and its norm to the host: the main thread never does)."""
        self._seen.append(gi)
        self._finite[gi] = finite
        if self._order is None:  # first step: one stream per group, at most 2 queued
            while len(self._jobs) >= MAX_WAITING:
                self._jobs.pop(0).result()
            self._jobs.append(self._thread.submit(self._stream, [gi], {gi: grad}))
            return
        with self._cv:
            self._arrived[gi] = grad
            self._cv.notify_all()
            while not self._may_continue():
                self._cv.wait(timeout=1.0)
                if self._jobs and self._jobs[0].done():  # the thread failed: surface it
                    self._jobs[0].result()
                    break

    def _may_continue(self) -> bool:
        waiting = [g for g in self._arrived if g != self._wanted]
        return len(waiting) < MAX_WAITING or (self._wanted is not None
                                              and self._wanted not in self._arrived)

    def finish(self, n_groups: int) -> None:
        """Backward is over (every group arrived): wait for the thread, keep the order."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.result()
        complete = sorted(self._seen) == list(range(n_groups))
        self._order = list(self._seen) if complete else None
        self._arrived.clear()

    def close(self) -> None:
        """Stop the thread; a stream still waiting for gradients (backward failed) gives up."""
        with self._cv:
            self._abort = True
            self._cv.notify_all()
        for job in self._jobs:
            job.exception()  # its error, if any, was the abort or was raised at finish()
        self._jobs = []
        self._thread.shutdown(wait=True)

    # ------------------------------------------------------------------ the thread
    def _take(self, gi: int, given: dict | None) -> torch.Tensor:
        if given is not None:
            return given[gi]
        with self._cv:
            self._wanted = gi
            self._cv.notify_all()
            while gi not in self._arrived:
                if self._abort:
                    raise RuntimeError("the overlapped optimizer step was abandoned (closed "
                                       "before backward delivered every gradient)")
                self._cv.wait(timeout=1.0)
            self._wanted = None
            return self._arrived[gi]

    def _release(self, gi: int) -> None:
        with self._cv:
            self._arrived.pop(gi, None)
            self._cv.notify_all()

    @torch.no_grad()
    def _stream(self, order: list[int], given: dict | None = None) -> None:
        order_pieces = [k for gi in order for k in self.by_group[gi]]
        done: list[int] = []  # groups whose last piece was stepped
        for k, views in self.tier.stream(order_pieces, keys=self.keys, write=self.keys):
            self._after(done)  # resumed: the previous piece's writes are submitted now
            gi, lo, hi = self.pieces[k]
            grad = self._take(gi, given)
            if self._is_finite(gi):  # a non-finite gradient never reaches the state
                self.step_piece(k, views, grad[lo:hi])
            if k == self.by_group[gi][-1]:
                self._release(gi)
                done.append(gi)
        self._after(done)

    def _is_finite(self, gi: int) -> bool:
        finite = self._finite[gi]
        if callable(finite):
            finite = self._finite[gi] = finite()
        return finite

    def _after(self, done: list[int]) -> None:
        """Groups whose master writes are all submitted (what ``after_group`` needs)."""
        while done and self.after_group is not None:
            self.after_group(done.pop())
        done.clear()
