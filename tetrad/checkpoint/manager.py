"""``CheckpointManager``: lazy asynchronous saves after DataStates-LLM.

Parameters and optimizer state do not change between the end of one optimizer step and
the start of the next, so ``save()`` only starts a background thread and returns: the
thread copies every piece into pre-allocated host buffers (reused from save to save) while
the next forward and backward run, then writes and commits the files. The training loop
calls ``wait_for_snapshot()`` right before the next optimizer step — the one moment the
state would change under the copy — and it blocks only if the copy is unfinished. On an
accelerator the copies run on a stream of their own, ordered after an event the training
thread records in ``save()``, and ``wait_for_snapshot`` only makes the compute stream wait for
them (on the device): the CPU goes on, and nothing waits with a device-wide synchronize. With
``async_save=False`` the same work runs inline and ``save()`` returns once committed.

A save that fails on the disk (full, I/O error, read-only, directory gone) removes what it
wrote — this rank's files; on rank 0 the whole temporary — and never touches a committed
checkpoint. With ``tolerate_failures`` the failure is only recorded (``take_outcomes``) for
the caller to agree on across ranks; otherwise it is raised at the next wait, as before.
"""

from __future__ import annotations

import errno as errno_mod
import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tetrad.checkpoint.fileio import CheckpointError
from tetrad.checkpoint.pieces import Piece
from tetrad.checkpoint.writer import (TMP, SaveAborted, commit, pieces_device, rank_stem, snapshot_buffers,
                                      step_dirname, total_bytes, write_rank)
from tetrad.device import DeviceCopies

# What a full or broken disk raises; anything else from a save is a bug and is re-raised.
_DISK_ERRORS = (OSError, CheckpointError)


@dataclass
class SaveOutcome:
    """How one save ended on this rank: written (rank > 0) or committed (rank 0), or failed."""

    step: int
    ok: bool
    error: BaseException | None = None

    @property
    def errno(self) -> int:
        """The OS error number behind the failure (0 when it was not an OS error)."""
        err = self.error
        while err is not None and not isinstance(err, OSError):
            err = err.__cause__
        return getattr(err, "errno", None) or 0

    def describe(self) -> str:
        """'[Errno 28] No space left on device (ENOSPC): <file>' or the error's text."""
        code = self.errno
        name = f" ({errno_mod.errorcode.get(code, code)})" if code else ""
        text = str(self.error).strip().splitlines()[0][:300] if self.error else "ok"
        return f"{text}{name}"


class CheckpointManager:
    """Saves pieces under ``root``; one instance per rank, all ranks calling ``save`` at the same steps."""

    def __init__(self, root: str | Path, *, rank: int = 0, world_size: int = 1, keep: int = 2,
                 async_save: bool = True, layout: dict | None = None, run_id: str = "run",
                 commit_timeout: float = 600.0, tolerate_failures: bool = False):
        self.root = Path(root)
        self.rank, self.world, self.keep = rank, world_size, keep
        self.async_save, self.layout, self.run_id = async_save, dict(layout or {}), str(run_id)
        self.commit_timeout = commit_timeout
        self.tolerate_failures = tolerate_failures
        # Created once, here: a save never re-creates a vanished root (an unmounted file
        # system's mount point must not silently fill up instead).
        self.root.mkdir(parents=True, exist_ok=True)
        self._pool: dict = {}
        self._copies: DeviceCopies | None = None  # made for the first save's device
        self._queued = threading.Event()  # the snapshot's copies are all issued ...
        self._queued.set()
        self._last_copy = None            # ... and this handle covers them
        self._thread: threading.Thread | None = None
        self._snapshot_done = threading.Event()
        self._snapshot_done.set()
        self._written = threading.Event()  # this rank's files of the last save are done (or failed)
        self._written.set()
        self._error: BaseException | None = None  # an unexpected error, raised on the training thread
        self._lock = threading.Lock()
        self._aborted: set[int] = set()  # saves a peer's failure cancelled
        self._finished: set[int] = set()  # saves whose background work has ended
        self._outcomes: list[SaveOutcome] = []
        # Seconds the training loop spent blocked per save, and the background timings.
        self.stats: list[dict] = []

    # ------------------------------------------------------------------ training-loop side
    def save(self, step: int, pieces: list[Piece], extra: dict | None = None) -> None:
        """Checkpoint ``pieces`` (this rank's; those with write=False are skipped) at ``step``."""
        start = time.perf_counter()
        self.wait_for_flush()  # host buffers are reused: the previous save must be on disk
        try:
            extra = json.loads(json.dumps(extra or {}))  # frozen now; later mutation must not leak in
        except TypeError as e:
            raise CheckpointError(f"checkpoint extra state for step {step} is not JSON: {e}") from e
        mine = [p for p in pieces if p.write]
        record = {"step": step, "bytes": total_bytes(mine)}
        self.stats.append(record)
        self._written.clear()
        if not self.async_save:
            self._run(step, mine, extra, record, snapshot=False)
            record["stall_s"] = time.perf_counter() - start
            self._raise_pending()
            return
        self._snapshot_done.clear()
        self._queued.clear()
        device = pieces_device(mine)
        if self._copies is None or self._copies.device != device:
            self._copies = DeviceCopies(device)
        after = self._copies.mark()  # the state as of now, on the training thread's stream
        self._thread = threading.Thread(target=self._run, args=(step, mine, extra, record, True, after),
                                        name=f"tetrad-ckpt-{step}", daemon=True)
        self._thread.start()
        record["stall_s"] = time.perf_counter() - start

    def wait_for_snapshot(self) -> None:
        """Before an optimizer step: the host copy of the last save must be complete before the
        state changes. On the CPU this blocks until it is; on an accelerator only until its
        copies are queued, then the compute stream waits for them on the device."""
        if self._snapshot_done.is_set():
            return
        start = time.perf_counter()
        if self._copies is not None and not self._copies.on_host:
            self._queued.wait()
            self._copies.order_after(self._last_copy)
        else:
            self._snapshot_done.wait()
        if self.stats:
            self.stats[-1]["stall_s"] = self.stats[-1].get("stall_s", 0.0) + time.perf_counter() - start
        self._raise_pending()

    def wait_for_write(self) -> None:
        """Block until this rank's files of the last save are written or have failed (rank 0:
        not its commit, which waits for the other ranks)."""
        self._written.wait()

    def wait_for_flush(self, timeout: float | None = None) -> None:
        """Block until the last save is written (and, on rank 0, committed); re-raise its error.

        With ``timeout`` give up after that many seconds (a dead peer's shard never comes):
        the save stays an uncommitted temporary that resume ignores."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return
            self._thread = None
        self._raise_pending()

    def abort(self, step: int) -> None:
        """Cancel save ``step`` because another rank's part of it failed: rank 0 stops waiting
        to commit it, and every rank removes what it wrote (now, or when its writer ends)."""
        with self._lock:
            self._aborted.add(step)
            finished = step in self._finished
        if finished:
            self._discard(step, agreed=True)

    def take_outcomes(self) -> list[SaveOutcome]:
        """Outcomes of saves finished since the last call, oldest first (aborted ones omitted)."""
        with self._lock:
            out, self._outcomes = self._outcomes, []
        return out

    def close(self, timeout: float | None = None) -> None:
        """Finish everything in flight; call at the end of training and before exiting."""
        self.wait_for_flush(timeout)

    # ------------------------------------------------------------------ background side
    def _issued(self, handle) -> None:
        self._last_copy = handle
        self._queued.set()

    def _run(self, step: int, pieces: list[Piece], extra: dict, record: dict, snapshot: bool = True,
             after=None) -> None:
        try:
            if snapshot:
                try:
                    t0 = time.perf_counter()
                    pieces = snapshot_buffers(pieces, self._pool, self._copies, after, self._issued)
                    record["snapshot_s"] = time.perf_counter() - t0
                finally:
                    self._queued.set()  # (also when the copy failed: never leave a waiter hanging)
                    self._snapshot_done.set()
            outcome = self._flush(step, pieces, extra, record)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            self._error, outcome = e, None
        finally:
            self._written.set()
        with self._lock:
            self._finished.add(step)
            aborted = step in self._aborted
            if outcome is not None and not aborted:
                self._outcomes.append(outcome)
        if aborted:
            self._discard(step, agreed=True)
        elif outcome is not None and not outcome.ok:
            # Only this rank's files for now: removing the shared temporary before the failure
            # is agreed would fail the other ranks' writes too and hide the first error.
            self._discard(step, agreed=not self.tolerate_failures)
        if outcome is not None and not outcome.ok and not self.tolerate_failures:
            self._error = CheckpointError(f"checkpoint save under {self.root} failed: "
                                          f"{outcome.describe()}")
            self._error.__cause__ = outcome.error

    def _flush(self, step: int, pieces: list[Piece], extra: dict, record: dict) -> SaveOutcome:
        t0 = time.perf_counter()
        tmp = self.root / (step_dirname(step) + TMP)
        try:
            write_rank(tmp, self.rank, step, self.run_id, pieces)
        except _DISK_ERRORS as e:
            return SaveOutcome(step, False, e)
        finally:
            record["write_s"] = time.perf_counter() - t0
            self._written.set()
        if self.rank == 0:
            try:
                commit(self.root, step, self.world, self.run_id, self.layout, extra, self.keep,
                       self.commit_timeout, cancelled=lambda: step in self._aborted)
            except SaveAborted:
                return SaveOutcome(step, False, None)  # a peer failed; the agreement counted it
            except _DISK_ERRORS as e:
                return SaveOutcome(step, False, e)
        record["flush_s"] = time.perf_counter() - t0
        return SaveOutcome(step, True)

    def _discard(self, step: int, agreed: bool) -> None:
        """Remove what this rank wrote for ``step``'s uncommitted save; once the failure is
        ``agreed`` (every rank knows), also the temporary itself (rank 0: all of it). Best
        effort: the next commit's prune removes anything left over."""
        tmp = self.root / (step_dirname(step) + TMP)
        if agreed and self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        stem = rank_stem(self.rank)
        names = [stem + suffix for suffix in (".safetensors", ".index.json", ".index.json.part", ".done",
                                              ".done.part")]
        for name in names + (["manifest.json.part"] if self.rank == 0 else []):
            try:
                (tmp / name).unlink(missing_ok=True)
            except OSError:  # read-only or gone: nothing more this rank can do
                pass
        if agreed:
            try:
                tmp.rmdir()  # succeeds only once the other ranks' files are gone too
            except OSError:
                pass

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, CheckpointError):
                raise err
            raise CheckpointError(f"checkpoint save under {self.root} failed: {err}") from err
