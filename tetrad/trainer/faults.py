"""What the training loop does when something goes wrong, kept out of trainer.py.

* **Preemption.** SIGTERM, SIGINT and SIGUSR1 (what ``sbatch --signal=USR1@T`` sends ahead
  of a time limit) only set a flag. At the next step boundary every rank learns whether
  *any* rank was signalled (an all-reduce MAX, which also carries the checkpoint outcomes of
  :mod:`tetrad.checkpoint.health`), so all of them stop after the same step; no rank leaves
  a collective half done. The loop then commits a checkpoint of that step -- even with
  ``checkpoint.every: 0`` -- and returns normally, so the process exits 0 (a requeue hook
  can run) and the next launch resumes from it (``checkpoint.resume: auto``). A signal
  before the first step stops there: nothing new to save.
* **Failing checkpoint saves.** A save that fails on any rank is agreed on every rank,
  reported (rank 0, and ``checkpoint_failed`` in metrics.jsonl) and training goes on;
  ``checkpoint.max_failures`` failures in a row stop the run with :class:`CheckpointFault`.
* **Non-finite steps.** The global gradient norm is all-reduced over every group, so every
  rank sees the same NaN/inf and skips the same optimizer update (in ``tetrad.zero``);
  here skipped steps are counted into ``metrics.jsonl`` and the run stops with
  :class:`NumericalFault` after ``run.max_skipped_steps`` of them in a row.
* **Dead or hung peers.** A collective that fails (gloo: "connection closed by peer") or
  times out after ``run.collective_timeout_s`` becomes a :class:`RankFailure` naming the
  ranks that did not check in on the rendezvous store, which outlives the workers under
  torchrun (the agent hosts it). The process exits non-zero; under
  ``torchrun --max-restarts N`` the job restarts and resumes from the newest intact checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tetrad.trainer.preempt import Preemption

__all__ = ["CheckpointFault", "FaultGuard", "NumericalFault", "Preemption", "RankFailure", "TrainingFault"]

# How long a survivor waits for its peers to check in before naming the missing ones.
_CHECK_IN_S = 5.0
# Substrings of backend errors that mean "a peer is gone" rather than a bug in this rank.
_COMM_WORDS = ("connection", "gloo", "nccl", "timed out", "timeout", "socket", "broken pipe", "peer")


class TrainingFault(RuntimeError):
    """A fault the run cannot continue through; the CLI prints it and exits 1."""


class NumericalFault(TrainingFault):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class RankFailure(TrainingFault):
    """A peer rank died or hung: a collective failed or timed out."""


class CheckpointFault(TrainingFault):
    """Too many checkpoint saves in a row failed (full disk, I/O errors, a lost directory)."""


# ---------------------------------------------------------------------------- skipped steps
class SkippedSteps:
    """Counts skipped optimizer steps; raises after ``limit`` in a row."""

    def __init__(self, limit: int, total: int = 0):
        self.limit, self.total, self.in_row = limit, total, 0

    def observe(self, record: dict) -> None:
        """Add ``skipped_steps`` (running total) to a step's metrics record."""
        skipped = bool(record.get("skipped")) or not _finite(record.get("loss"))
        record["skipped"] = skipped
        self.in_row = self.in_row + 1 if skipped else 0
        self.total += skipped
        record["skipped_steps"] = self.total

    def check(self, record: dict) -> None:
        if self.in_row < self.limit:
            return
        step = record["step"]
        raise NumericalFault(
            f"{self.in_row} optimizer steps in a row (steps {step - self.in_row + 1}..{step}) were skipped "
            f"because the loss or the global gradient norm was not finite (last loss={record.get('loss')}, "
            f"grad_norm={record.get('grad_norm')}); the weights are those of step {step - self.in_row}. "
            f"Lower optimizer.lr, check the data, prefer bf16 to fp16, or raise "
            f"run.max_skipped_steps={self.limit}")


def _finite(value) -> bool:
    return value is None or math.isfinite(value)


# ---------------------------------------------------------------------------- dead peers
def is_comm_failure(err: BaseException) -> bool:
    """Whether an exception from a collective means a peer failed (not a bug on this rank)."""
    if isinstance(err, dist.DistError):
        return True
    return isinstance(err, RuntimeError) and any(w in str(err).lower() for w in _COMM_WORDS)


def unresponsive_ranks(rank: int, world: int, wait_s: float = _CHECK_IN_S) -> list[int] | None:
    """Ranks that do not check in on the rendezvous store within ``wait_s`` (dead or hung).

    None when the store itself is unreachable (it lives in rank 0 outside torchrun, so
    rank 0 is then the likely casualty).
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefix = f"tetrad/alive/{attempt}/"
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{prefix}{rank}", "1")
        missing = set(range(world)) - {rank}
        deadline = time.monotonic() + wait_s
        while missing and time.monotonic() < deadline:
            missing -= {r for r in missing if store.check([f"{prefix}{r}"])}
            time.sleep(0.1)
        return sorted(missing)
    except Exception:  # noqa: BLE001 - any store error means: cannot tell
        return None


def rank_failure(err: BaseException, rank: int, world: int, what: str, timeout_s: float) -> RankFailure:
    dead = unresponsive_ranks(rank, world, min(_CHECK_IN_S, timeout_s))
    if dead is None:
        who = "the rendezvous store is unreachable, so rank 0 (its host outside torchrun) is likely dead"
    elif dead:
        who = (f"rank{'s' if len(dead) > 1 else ''} {', '.join(map(str, dead))} did not check in "
               f"within {min(_CHECK_IN_S, timeout_s):.0f}s (dead or hung)")
    else:
        who = "every rank checked in afterwards (a transient network fault?)"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return RankFailure(f"rank {rank}: {what} failed: {who}; the collective said: {first[:200]}. "
                       f"Collectives wait at most run.collective_timeout_s={timeout_s:g}s. Under "
                       f"torchrun --max-restarts N the job restarts from the newest intact checkpoint")


# ---------------------------------------------------------------------------- the loop's view
class FaultGuard:
    """One Trainer's fault handling: ``with guard.step(n): ...`` around each step's
    collectives, ``agree`` before logging a step, ``check`` after."""

    def __init__(self, config, engine, output_dir: Path, skipped_total: int = 0,
                 preemption: Preemption | None = None):
        self.engine, self.run = engine, config.run
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        total = torch.tensor([skipped_total], dtype=torch.int64, device=engine.device)
        dist.broadcast(total, src=0)  # only rank 0 reads metrics.jsonl back on resume
        self.skips = SkippedSteps(self.run.max_skipped_steps, int(total))
        self.preemption = preemption if preemption is not None else Preemption().install()
        self.failed = False
        self.signum = 0
        write_pid_file(output_dir, self.rank)
        self._inject = _TestFaults(engine, self.rank, self.world)

    @contextlib.contextmanager
    def step(self, step: int, what: str = "step"):
        """Turn a collective failure inside the block into a RankFailure naming the dead ranks."""
        try:
            with self._inject.around(step):
                yield
        except Exception as err:
            if not is_comm_failure(err):
                raise
            self.failed = True
            raise rank_failure(err, self.rank, self.world, f"{what} {step}",
                               self.run.collective_timeout_s) from err

    def observe(self, record: dict) -> None:
        self.skips.observe(record)

    def agree(self, step: int, record: dict | None, checkpoints, trained: bool = True) -> bool:
        """At a step boundary: one all-reduce tells every rank whether any was signalled and
        how the checkpoint saves ended; failures go into ``record``. True when preempted
        (then a checkpoint of ``step`` has been committed, or its failure reported; with
        ``trained`` False -- before the first step -- there is nothing new to save)."""
        agreement = checkpoints.agreement
        with self.step(step, "preemption check after step"):
            values = self.preemption.agreed(self.engine.device, agreement.local(),
                                            self.engine.layout.nodes.traffic)
            agreement.apply(values[1:])
            self.signum = values[0]
            if self.signum and trained:
                self._checkpoint_now(step, checkpoints)
        self._report(agreement, record)
        if self.signum and self.rank == 0:
            name = signal.Signals(self.signum).name
            print(f"tetrad: {name} received: stopped {self._where(step, checkpoints, trained)}", flush=True)
        return bool(self.signum)

    def check(self, record: dict, checkpoints) -> None:
        """Raise after too many skipped steps or failed checkpoint saves in a row (every
        rank at the same step: both counts are agreed)."""
        self.skips.check(record)
        if checkpoints.agreement.should_stop:
            raise CheckpointFault(checkpoints.agreement.stop_message())

    def finish(self, step: int, record: dict, checkpoints) -> None:
        """After the last step: the last save committed (or its failure agreed) into ``record``."""
        with self.step(step, "final checkpoint after step"):
            checkpoints.finish()
        self._report(checkpoints.agreement, record)

    def _checkpoint_now(self, step: int, checkpoints) -> None:
        checkpoints.after_step(step, force=True)  # no-op if this step was just saved
        checkpoints.finish()  # synchronous: committed (or failed, agreed) before we exit

    def _where(self, step: int, checkpoints, trained: bool) -> str:
        agreement = checkpoints.agreement
        if not trained:
            return f"before training past step {step}: nothing new to checkpoint; relaunch to resume"
        if agreement.committed(step):
            return f"after step {step}, checkpoint committed under {checkpoints.root}; relaunch to resume"
        last = agreement.last_committed
        since = f"step {last}" if last is not None else "the newest checkpoint from before this run, if any"
        return f"after step {step}, but its checkpoint failed (see above); a relaunch resumes from {since}"

    def _report(self, agreement, record: dict | None) -> None:
        reports = agreement.take_reports()
        if reports and record is not None:
            record["checkpoint_failed"] = reports
        if self.rank == 0:
            for report in reports:
                print(f"tetrad: {agreement.describe(report)}", file=sys.stderr, flush=True)

    def close_timeout(self) -> float | None:
        """How long to wait for an in-flight checkpoint at exit: until it is committed, unless
        a peer is gone (its shard may never come; the previous checkpoint stays intact)."""
        return min(_CHECK_IN_S, self.run.collective_timeout_s) if self.failed else None

    def close(self) -> None:
        """Nothing to undo here: the signal handlers belong to whoever installed them."""


def write_pid_file(output_dir: Path, rank: int) -> Path:
    """``<output_dir>/pids/rank_<r>.pid`` = "pid host": lets operators (and tests) find a rank."""
    path = Path(output_dir) / "pids" / f"rank_{rank:05d}.pid"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{os.getpid()} {socket.gethostname()}\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------- TEST-ONLY hooks
class _TestFaults:
    """TEST-ONLY fault injection, driven by environment variables, on the last rank:

    * ``TETRAD_FAULT_NAN_AT_STEP=3,4``      the model's output is NaN (so loss and gradients are)
    * ``TETRAD_FAULT_INF_GRAD_AT_STEP=5``   one parameter's gradient is +inf (loss stays finite)

    Nothing happens unless one is set; see tests/test_faults_numeric.py.
    """

    def __init__(self, engine, rank: int, world: int):
        self.engine = engine
        self.active = rank == world - 1
        self.nan = _steps(os.environ.get("TETRAD_FAULT_NAN_AT_STEP"))
        self.inf = _steps(os.environ.get("TETRAD_FAULT_INF_GRAD_AT_STEP"))

    @contextlib.contextmanager
    def around(self, step: int):
        if not self.active or step not in self.nan | self.inf:
            yield
            return
        if step in self.nan:
            handle = self.engine.model.register_forward_hook(lambda m, i, out: out * float("nan"))
        else:
            param = next(p for p in self.engine.model.parameters() if p.requires_grad)
            handle = param.register_hook(lambda g: torch.full_like(g, float("inf")))
        try:
            yield
        finally:
            handle.remove()


def _steps(spec: str | None) -> set[int]:
    return {int(s) for s in spec.split(",") if s.strip()} if spec else set()
