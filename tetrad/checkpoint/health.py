"""Agreeing on how each checkpoint save ended, so every rank counts failures alike.

A save can fail on one rank (its node's disk is full, an I/O error) while the others
succeed, and rank 0 commits only once every rank's files exist. Ranks learn each other's
outcomes from two integers all-reduced with MAX: at every step boundary (folded into the
loop's preemption all-reduce, so no extra collective there) and once before a new save
starts, after this rank's own part of the previous save is written, so that rank 0 never
waits for a commit whose other half failed. Every rank applies the same agreed numbers in
the same order, so every rank reaches ``checkpoint.max_failures`` at the same step and the
run stops together, never with one rank gone and the others hanging.
"""

from __future__ import annotations

import errno as errno_mod
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from tetrad.checkpoint.manager import CheckpointManager, SaveOutcome
from tetrad.checkpoint.pieces import Piece
from tetrad.checkpoint.writer import total_bytes

# [committed step (rank 0 only), a failure packed as step | lowest failing rank | its errno]:
# packing keeps the three from one rank under an element-wise MAX (the newest failed save,
# then the lowest rank that failed it -- rank 0 when it did, whose message is the fullest).
WIDTH = 2
_RANK_BITS, _ERRNO_BITS = 20, 12
_RANK_MAX = (1 << _RANK_BITS) - 1


def pack_failure(step: int, rank: int, code: int) -> int:
    """One int64 that MAX-reduces to the newest step's lowest failing rank (steps < 2**31)."""
    rank_field = _RANK_MAX - min(rank, _RANK_MAX)
    return (step << (_RANK_BITS + _ERRNO_BITS)) | (rank_field << _ERRNO_BITS) | min(code, (1 << _ERRNO_BITS) - 1)


def unpack_failure(packed: int) -> tuple[int, int, int]:
    """(step, rank, errno) of ``pack_failure``; step 0 means no failure."""
    step = packed >> (_RANK_BITS + _ERRNO_BITS)
    rank = _RANK_MAX - ((packed >> _ERRNO_BITS) & _RANK_MAX)
    return step, rank, packed & ((1 << _ERRNO_BITS) - 1)


class SaveAgreement:
    """Outcomes of one run's saves, agreed across ranks; failures in a row since the last commit."""

    def __init__(self, manager: CheckpointManager, rank: int, max_failures: int):
        self.manager, self.rank, self.max_failures = manager, rank, max_failures
        self.last_committed: int | None = None
        self.in_row: list[dict] = []  # agreed failures since the last commit, oldest first
        self._failed: set[int] = set()
        self._queue: list[SaveOutcome] = []  # this rank's outcomes not yet agreed
        self._reports: list[dict] = []  # newly agreed failures, for the loop to log

    # ------------------------------------------------------------------ this rank's part
    def local(self) -> list[int]:
        """This rank's contribution to the all-reduce (MAX), ``WIDTH`` integers."""
        self._queue += self.manager.take_outcomes()
        committed = max((o.step for o in self._queue if o.ok), default=0) if self.rank == 0 else 0
        failure = next((o for o in self._queue if not o.ok and o.step not in self._failed), None)
        if failure is None:
            return [committed, 0]
        return [committed, pack_failure(failure.step, self.rank, failure.errno)]

    # ------------------------------------------------------------------ everyone's part
    def apply(self, agreed: list[int]) -> None:
        """Apply the all-reduced numbers (the same on every rank), oldest step first."""
        committed, packed = (int(v) for v in agreed)
        failed, rank, code = unpack_failure(packed)
        events = []
        if committed and committed > (self.last_committed or 0):
            events.append((committed, 1))
        if failed and failed not in self._failed:
            events.append((failed, 0))
        for step, ok in sorted(events):
            if ok:
                self.last_committed, self.in_row = step, []
            else:
                self._fail(step, code, rank)
        self._queue = [o for o in self._queue
                       if not (o.ok and o.step <= committed) and o.step not in self._failed]

    def _fail(self, step: int, code: int, rank: int) -> None:
        self._failed.add(step)
        self.manager.abort(step)  # rank 0 stops waiting for it; every rank removes its part
        # A failure older than a save that has since committed does not count toward stopping.
        counts = self.last_committed is None or step > self.last_committed
        # The failing rank's own text (with the file name) where this rank is the one named.
        mine = next((o for o in self._queue if o.step == step and not o.ok), None) if rank == self.rank else None
        report = {"step": step, "rank": rank, "errno": code,
                  "error": errno_mod.errorcode.get(code, "not an OS error") if code else "not an OS error",
                  "dir": str(self.manager.root),
                  "message": mine.describe() if mine is not None else _strerror(code)}
        if counts:
            self.in_row.append(report)
        report["in_row"] = len(self.in_row)
        self._reports.append(report)

    def settle(self, device: torch.device) -> None:
        """Before a new save: once this rank's part of the previous one is written, agree on
        every rank's outcome (a collective: every rank calls it at the same steps)."""
        self.manager.wait_for_write()
        self.apply(all_max(self.local(), device))

    def finish(self, device: torch.device) -> None:
        """Wait for the save in flight to be committed or to fail, agreed on every rank."""
        self.settle(device)  # a failed part aborts rank 0's commit instead of letting it wait
        self.manager.wait_for_flush()
        self.apply(all_max(self.local(), device))

    def take_reports(self) -> list[dict]:
        """Failures agreed since the last call (every rank gets the same list)."""
        out, self._reports = self._reports, []
        return out

    @property
    def should_stop(self) -> bool:
        return len(self.in_row) >= self.max_failures

    def committed(self, step: int) -> bool:
        return self.last_committed == step

    # ------------------------------------------------------------------ messages
    def describe(self, report: dict) -> str:
        """Rank 0's line for one agreed failure."""
        last = (f"the last committed checkpoint (step {self.last_committed}) is untouched"
                if self.last_committed is not None else "no checkpoint of this run is committed yet")
        where = f"rank {report['rank']}" if report["rank"] != self.rank else "this rank (0)"
        goes_on = "stopping" if report["in_row"] >= self.max_failures else "training goes on"
        return (f"checkpoint of step {report['step']} failed on {where}: {report['message']}, under "
                f"{report['dir']}; its partial files were removed and {last}; {goes_on} "
                f"({report['in_row']} of checkpoint.max_failures={self.max_failures} in a row)")

    def stop_message(self) -> str:
        steps = ", ".join(str(r["step"]) for r in self.in_row)
        last = self.in_row[-1]
        kept = (f"step {self.last_committed} is the newest committed checkpoint (intact)"
                if self.last_committed is not None else "no checkpoint of this run was committed")
        # The same text on every rank: from the agreed numbers only (the failing rank's own
        # line, with the file name, was printed by rank 0 when it was that rank).
        n = len(self.in_row)
        return (f"{n} checkpoint save{'s' if n > 1 else ''} in a row failed (step{'s' if n > 1 else ''} "
                f"{steps}); the last on rank "
                f"{last['rank']}: {_strerror(last['errno'])}, under {last['dir']}. Stopping: {kept}. Free space or "
                f"fix the file system, point checkpoint.dir elsewhere, or raise "
                f"checkpoint.max_failures={self.max_failures}")


def _strerror(code: int) -> str:
    if not code:
        return "see that rank's log"
    return f"[Errno {code}] {os.strerror(code)} ({errno_mod.errorcode.get(code, code)})"


def all_max(values: list[int], device: torch.device) -> list[int]:
    """Element-wise MAX of ``values`` over the world (the same list on every rank)."""
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [int(v) for v in t.tolist()]


def warn_if_no_room(root: Path, pieces: list[Piece], device: torch.device, rank: int) -> int:
    """Warn (rank 0) when ``root`` has less free space than one checkpoint; returns the estimate.

    The estimate is every rank's share of ``pieces`` (summed with an all-reduce), plus the
    JSON that describes them (an index and a manifest entry per piece, a few small files per
    rank). AdamW's two moments exist only after the first optimizer step; before it they are
    counted at the masters' size, so the estimate does not undercount a fresh run.
    """
    mine = [p for p in pieces if p.write]
    size = total_bytes(mine) + _JSON_PER_PIECE * len(mine) + _FILES_PER_RANK
    if not any(p.name.startswith("optim/") and p.name.count("/") >= 2 for p in mine):  # optim/<key>/<param>
        size += 2 * total_bytes([p for p in mine if p.name.startswith("model/")])
    total = torch.tensor([size], dtype=torch.int64, device=device)
    dist.all_reduce(total)
    need = int(total)
    if rank == 0:
        free = shutil.disk_usage(root).free
        if free < need:
            warnings.warn(f"checkpoint.dir {root} has {_size(free)} free, but one checkpoint of this run "
                          f"needs about {_size(need)}: saves will fail (the run goes on, and stops after "
                          f"checkpoint.max_failures failures in a row)", stacklevel=2)
    return need


# Measured on a small GPT checkpoint: ~310 B per piece in a rank's index, ~370 in the manifest.
_JSON_PER_PIECE, _FILES_PER_RANK = 700, 16 << 10


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"
