"""Timeline of a pipeline rank: busy/idle (bubble) accounting and Chrome-trace export.

Every compute action (F, B, W) is timed with ``perf_counter`` (after a device synchronize on
an accelerator: ``clock``); everything else in the
schedule (waiting for a receive, posting sends) is idle. A step starts at a barrier of the
pp group, so all ranks share an origin, and lasts until the slowest rank's last action: the
bubble of a rank is ``1 - busy / makespan``, the quantity the papers' formulas predict.

The trace is the Chrome trace-event JSON format (``{"traceEvents": [...]}``, complete events
``ph: "X"`` with microsecond ``ts``/``dur``, ``pid`` = global rank): open the per-rank files
in chrome://tracing or https://ui.perfetto.dev. Timestamps are this machine's monotonic clock,
so files of ranks on one host line up.
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.distributed as dist

_NAMES = {"F": "forward", "B": "backward", "W": "weight-grad"}


def clock(device: torch.device):
    """A ``perf_counter`` that, on an accelerator, first waits for the work queued so far:
    kernels run asynchronously, so an unsynchronised clock would time their launch, not their
    run, and bubbles and traces would mean nothing. Only instrumented runs pay for it."""
    if device.type == "cpu":
        return time.perf_counter

    def synced() -> float:
        torch.accelerator.synchronize(device)
        return time.perf_counter()
    return synced


def trace_path(path: str, rank: int) -> str:
    """One file per rank: ``{rank}`` in ``path`` is replaced, else ``.rank<r>`` goes before ``.json``."""
    if "{rank}" in path:
        return path.format(rank=rank)
    root, ext = os.path.splitext(path)
    return f"{root}.rank{rank}{ext or '.json'}"


class Timeline:
    """Per-step busy time and, optionally, the events of the first ``max_steps`` steps."""

    def __init__(self, rank: int, trace: str | None = None, max_steps: int = 20):
        self.rank, self.trace, self.max_steps = rank, trace, max_steps
        self.events: list[dict] = []
        self.steps = 0
        self.start = self.end = 0.0
        self.busy = 0.0

    def begin_step(self, group, device: torch.device | None = None) -> None:
        dist.barrier(group=group)
        self.start = self.end = clock(device or torch.device("cpu"))()
        self.busy = 0.0

    def record(self, kind: str, mb: int, chunk: int, t0: float, t1: float) -> None:
        self.busy += t1 - t0
        self.end = t1
        if self.trace and self.steps < self.max_steps:
            self.events.append({"name": f"{kind}{mb}" + (f".c{chunk}" if chunk else ""),
                                "cat": _NAMES[kind], "ph": "X", "pid": self.rank, "tid": chunk,
                                "ts": t0 * 1e6, "dur": (t1 - t0) * 1e6,
                                "args": {"step": self.steps, "micro_batch": mb, "chunk": chunk}})

    def end_step(self, group, device) -> dict[str, float]:
        """This step's {busy_s, makespan_s, bubble}; writes the trace file when tracing."""
        span = torch.tensor([self.end - self.start], dtype=torch.float64, device=device)
        dist.all_reduce(span, op=dist.ReduceOp.MAX, group=group)
        makespan = float(span)
        if self.trace and self.steps < self.max_steps:
            self._mark_step()
            self.write()
        self.steps += 1
        return {"busy_s": self.busy, "makespan_s": makespan,
                "bubble": 1.0 - self.busy / makespan if makespan > 0 else 0.0}

    def _mark_step(self) -> None:
        self.events.append({"name": f"step {self.steps}", "cat": "step", "ph": "X", "pid": self.rank,
                            "tid": -1, "ts": self.start * 1e6, "dur": (self.end - self.start) * 1e6})

    def write(self) -> None:
        """Rewrite this rank's trace file (whole, so a crashed run still leaves a valid file)."""
        path = trace_path(self.trace, self.rank)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        meta = [{"name": "process_name", "ph": "M", "pid": self.rank, "args": {"name": f"rank {self.rank}"}}]
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"traceEvents": meta + self.events, "displayTimeUnit": "ms"}, f)
        os.replace(tmp, path)
