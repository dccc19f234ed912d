"""Runs one rank's action list for a step: forwards, backwards, weight-gradient passes, p2p.

The executor knows nothing of data parallelism or optimizers: it accumulates gradients into
``param.grad`` over all micro-batches and returns the summed loss (on the last stage). The
caller decides when gradients are synchronised -- once, after ``run`` -- and steps.

Where a schedule runs each chunk in long runs of passes (``actions.held_spans``: looped
breadth-first), the executor tells a ``residency`` (the data-parallel engine, duck-typed:
``hold(params, backward)`` / ``release(params, done)``, ``done`` after the chunk's last pass of
the step) where each run starts and ends, so ZeRO-3 gathers a chunk once per run rather than
once per pass and can reduce its gradients as soon as they are final; the executor imports
nothing of ZeRO.

Where the placement puts two consecutive chunks on one rank (ZB-V's turn on the last rank)
the activation and its gradient are handed over in memory (``_local``) instead of by p2p.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
from tetrad.parallel.pipeline.p2p import ACT, GRAD, StageComm
from tetrad.parallel.pipeline.actions import Action, Placement, held_spans
from tetrad.parallel.pipeline.split import Chunk
from tetrad.parallel.pipeline.trace import Timeline, clock
from tetrad.parallel.pipeline.zero_bubble import WeightGradStore, exclude_recomputed


class PipelineExecutor:
    """``run(inputs, labels)`` executes ``schedule_fn(m)``'s actions for this rank.

    ``loss_fn(output, labels)`` is the per-micro-batch loss (reported); ``scale(loss)`` is what
    backward differentiates (e.g. ``loss / m``, times a loss scale).
    """

    def __init__(self, chunks: list[Chunk], schedule_fn: Callable[[int], list[Action]],
                 comm: StageComm, loss_fn: Callable, *, timeline: Timeline | None = None,
                 placement: Placement | None = None):
        self.chunks, self.schedule_fn, self.comm, self.loss_fn = chunks, schedule_fn, comm, loss_fn
        self.p = comm.size
        self.placement = placement or Placement(comm.size, len(chunks))
        self._local: dict[tuple[int, int, int], torch.Tensor] = {}  # (kind, from chunk, mb) -> tensor
        self.timeline = timeline
        self.store = WeightGradStore()
        # synchronised with the device only when someone reads the times (instrumented runs)
        self._clock = clock(comm.device) if timeline is not None else time.perf_counter
        exclude_recomputed(self.store, [layer for c in chunks for layer in c.layers])
        self.stats: dict[str, float] = {}

    def global_chunk(self, local: int) -> int:
        return self.placement.global_of(self.comm.rank, local)

    @property
    def last_rank(self) -> int:
        """The pp rank holding the last chunk (where the loss is)."""
        return self.placement.rank_of(self.placement.n_chunks - 1)

    def _here(self, chunk: int) -> bool:
        return self.placement.rank_of(chunk) == self.comm.rank

    def _send(self, t: torch.Tensor, kind: int, c: int, to: int, mb: int) -> None:
        if self._here(to):
            self._local[(kind, c, mb)] = t.detach()
        else:
            self.comm.send(t, kind, c, to, mb)

    def _recv(self, kind: int, c: int, mb: int) -> torch.Tensor:
        if self._here(c):
            return self._local.pop((kind, c, mb))
        return self.comm.recv(kind, c, mb)

    def run(self, inputs: list[torch.Tensor], labels: list[torch.Tensor],
            scale: Callable[[torch.Tensor], torch.Tensor] = lambda loss: loss,
            act_shape: tuple[int, ...] | None = None, residency=None) -> torch.Tensor:
        """One step over micro-batches ``inputs``/``labels``; returns the sum of their losses
        on the last stage (a zero elsewhere), as a detached fp64 scalar. ``act_shape`` is the
        [micro_batch, local_seq, d_model] of tensors crossing stages (default: as built).
        ``residency``: told where each held span of a chunk's passes starts and ends."""
        if act_shape is not None:
            self.comm.shape = tuple(act_shape)
        if self.comm.shape is None:
            raise ValueError("the pipeline needs the activation shape [micro_batch, local_seq, d_model]")
        m = len(inputs)
        actions = self.schedule_fn(m)
        split = any(a.kind == "W" for a in actions)
        self._inputs, self._labels, self._scale, self._split = inputs, labels, scale, split
        self._saved: dict[tuple[int, int], tuple] = {}
        self._total = torch.zeros((), dtype=torch.float64, device=self.comm.device)
        self._in_flight = self._peak = 0
        self.comm.reset_counts()
        if self.timeline:
            self.timeline.begin_step(self.comm.group, self.comm.device)
        spans = held_spans(actions) if residency is not None else None
        starts = {r.start: r for r in spans or ()}
        ends = {r.stop - 1: r for r in spans or ()}
        final = {actions[r.start].chunk: r for r in spans or ()}  # (the last one per chunk wins)
        for i, a in enumerate(actions):
            if i in starts:
                residency.hold(self.chunks[a.chunk].parameters(), backward=a.kind == "B")
            getattr(self, "_" + a.kind)(a)
            if i in ends:
                residency.release(self.chunks[a.chunk].parameters(), done=final[a.chunk] is ends[i])
            if self.timeline:
                self.timeline.record(a.kind, a.mb, a.chunk, *self._last_span)
            if i + 1 == len(actions) or not self._receives(actions[i + 1]):
                self.comm.flush()  # nothing to pair the sends with: post them now, not later
        self.comm.wait_sends()
        self._check_done()
        self.stats = {"peak_in_flight": self._peak, "sent_bytes": self.comm.sent_bytes,
                      "sent_messages": self.comm.sent_messages}
        if self.timeline:
            self.stats.update(self.timeline.end_step(self.comm.group, self.comm.device))
        return self._total

    def _receives(self, a: Action) -> bool:
        """The action waits on a p2p receive (not on nothing, or a hand-over in memory)."""
        chunk, c = self.chunks[a.chunk], self.global_chunk(a.chunk)
        return ((a.kind == "F" and not chunk.is_first and not self._here(c - 1))
                or (a.kind == "B" and not chunk.is_last and not self._here(c + 1)))

    # ------------------------------------------------------------------ actions
    def _F(self, a: Action) -> None:
        c = self.global_chunk(a.chunk)
        chunk = self.chunks[a.chunk]
        if chunk.is_first:
            x = self._inputs[a.mb]
        else:
            x = self._recv(ACT, c - 1, a.mb).requires_grad_()
        t0 = self._clock()
        with self.store.capture() if self._split else contextlib.nullcontext():
            out = chunk(x)
            if chunk.is_last:
                loss = self.loss_fn(out, self._labels[a.mb])
                self._total += loss.detach().double()
                out = self._scale(loss)
        self._last_span = (t0, self._clock())
        if not chunk.is_last:
            self._send(out, ACT, c, c + 1, a.mb)
        self._saved[(a.mb, a.chunk)] = (x, out)
        self._in_flight += 1
        self._peak = max(self._peak, self._in_flight)

    def _B(self, a: Action) -> None:
        c = self.global_chunk(a.chunk)
        chunk = self.chunks[a.chunk]
        x, out = self._saved.pop((a.mb, a.chunk))
        grad = None if chunk.is_last else self._recv(GRAD, c + 1, a.mb)
        t0 = self._clock()
        with self.store.backward_of((a.mb, a.chunk)) if self._split else contextlib.nullcontext():
            torch.autograd.backward(out, grad)
        self._last_span = (t0, self._clock())
        if not chunk.is_first:
            self._send(x.grad, GRAD, c, c - 1, a.mb)
        self._in_flight -= 1

    def _W(self, a: Action) -> None:
        t0 = self._clock()
        self.store.run((a.mb, a.chunk))
        self._last_span = (t0, self._clock())

    def _check_done(self) -> None:
        if self._saved or self.store.pending() or self._local:
            raise RuntimeError(f"pipeline schedule left work undone: activations of "
                               f"{sorted(self._saved)}, weight gradients of {self.store.pending()}, "
                               f"hand-overs {sorted(self._local)}")
