"""``CheckpointManager``: lazy asynchronous saves after DataStates-LLM.

Parameters and optimizer state do not change between the end of one optimizer step and
the start of the next, so ``save()`` only starts a background thread and returns: the
thread copies every piece into pre-allocated host buffers (reused from save to save) while
the next forward and backward run, then writes and commits the files. The training loop
calls ``wait_for_snapshot()`` right before the next optimizer step — the one moment the
state would change under the copy — and it blocks only if the copy is unfinished. With
``async_save=False`` the same work runs inline and ``save()`` returns once committed.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from tetrad.checkpoint.fileio import CheckpointError
from tetrad.checkpoint.pieces import Piece
from tetrad.checkpoint.writer import TMP, commit, snapshot_buffers, step_dirname, total_bytes, write_rank


class CheckpointManager:
    """Saves pieces under ``root``; one instance per rank, all ranks calling ``save`` at the same steps."""

    def __init__(self, root: str | Path, *, rank: int = 0, world_size: int = 1, keep: int = 2,
                 async_save: bool = True, layout: dict | None = None, run_id: str = "run",
                 commit_timeout: float = 600.0):
        self.root = Path(root)
        self.rank, self.world, self.keep = rank, world_size, keep
        self.async_save, self.layout, self.run_id = async_save, dict(layout or {}), str(run_id)
        self.commit_timeout = commit_timeout
        self._pool: dict = {}
        self._thread: threading.Thread | None = None
        self._snapshot_done = threading.Event()
        self._snapshot_done.set()
        self._error: BaseException | None = None
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
        if not self.async_save:
            self._flush(step, mine, extra, record)
            record["stall_s"] = time.perf_counter() - start
            return
        self._snapshot_done.clear()
        self._thread = threading.Thread(target=self._background, args=(step, mine, extra, record),
                                        name=f"tetrad-ckpt-{step}", daemon=True)
        self._thread.start()
        record["stall_s"] = time.perf_counter() - start

    def wait_for_snapshot(self) -> None:
        """Block until the host copy of the last save is complete (call before an optimizer step)."""
        if self._snapshot_done.is_set():
            return
        start = time.perf_counter()
        self._snapshot_done.wait()
        if self.stats:
            self.stats[-1]["stall_s"] = self.stats[-1].get("stall_s", 0.0) + time.perf_counter() - start
        self._raise_pending()

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

    def close(self, timeout: float | None = None) -> None:
        """Finish everything in flight; call at the end of training and before exiting."""
        self.wait_for_flush(timeout)

    # ------------------------------------------------------------------ background side
    def _background(self, step: int, pieces: list[Piece], extra: dict, record: dict) -> None:
        try:
            t0 = time.perf_counter()
            host = snapshot_buffers(pieces, self._pool)
            record["snapshot_s"] = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            self._error = e
            return
        finally:
            self._snapshot_done.set()
        try:
            self._flush(step, host, extra, record)
        except BaseException as e:  # noqa: BLE001
            self._error = e

    def _flush(self, step: int, pieces: list[Piece], extra: dict, record: dict) -> None:
        t0 = time.perf_counter()
        tmp = self.root / (step_dirname(step) + TMP)
        write_rank(tmp, self.rank, step, self.run_id, pieces)
        record["write_s"] = time.perf_counter() - t0
        if self.rank == 0:
            commit(self.root, step, self.world, self.run_id, self.layout, extra, self.keep,
                   self.commit_timeout)
        record["flush_s"] = time.perf_counter() - t0

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"checkpoint save under {self.root} failed: {err}") from err
