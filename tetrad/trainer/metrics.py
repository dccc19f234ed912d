"""Per-step metrics: ``metrics.jsonl`` (every step, flushed and fsynced so a crash loses no
committed line), TensorBoard events and a progress bar, all on rank 0 only."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch

from tetrad.compat import max_memory_allocated


def peak_rss_mb() -> float:
    """This process's peak resident set size, MiB.

    Linux's ``VmHWM`` (the high-water mark of this address space) where it exists: getrusage's
    ``ru_maxrss`` survives ``exec``, so a process started by a large parent (a benchmark
    driver, a test runner) would report the parent's peak as its own. ``ru_maxrss`` (KiB on
    Linux) elsewhere.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_device_mb(device: torch.device) -> float | None:
    if device.type == "cpu":
        return None
    return max_memory_allocated(device) / 2**20


def _records_through(path: Path, step: int) -> list[dict]:
    """The well-formed records of ``path`` with ``step <= step`` (a line a crash cut short is skipped)."""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(record)
    return kept


def last_record_through(path: Path, step: int) -> dict | None:
    """The last record of ``path`` at or before ``step`` (read only), or None."""
    kept = _records_through(path, step) if path.exists() else []
    return kept[-1] if kept else None


def keep_steps_through(path: Path, step: int) -> dict | None:
    """Atomically rewrite ``path`` keeping only records with ``step <= step`` (and dropping a
    line a crash cut short); returns the last kept record. A fresh run (step 0) starts empty."""
    if not path.exists():
        return None
    kept = _records_through(path, step)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return kept[-1] if kept else None


class MetricsLogger:
    """Writes one JSON object per optimizer step; a no-op on every rank but 0."""

    def __init__(self, output_dir: str | os.PathLike, *, enabled: bool, total_steps: int,
                 tensorboard: bool = True, progress: bool = True, start_step: int = 0):
        self.enabled = enabled
        self.resumed_record: dict | None = None  # the last kept line (rank 0), e.g. skipped_steps
        self._file = self._tb = self._bar = None
        if not enabled:
            return
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        # A resumed run recomputes the steps after its checkpoint: drop their old lines first.
        self.resumed_record = keep_steps_through(out / "metrics.jsonl", start_step)
        self._file = open(out / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        if progress and sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    @property
    def has_bar(self) -> bool:
        return self._bar is not None

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(f"train/{key}", value, record["step"])
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")

    def close(self) -> None:
        for thing in (self._bar, self._tb, self._file):
            if thing is not None:
                thing.close()
        self._file = self._tb = self._bar = None
