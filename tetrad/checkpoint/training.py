"""What the Trainer does about checkpoints: resume at start, save every N steps, finish at exit.

Kept out of trainer.py so the loop stays a loop. Collectives happen only here, on the main
thread, at construction and resume (the background writer never runs one).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from tetrad.checkpoint.discover import resolve_resume
from tetrad.checkpoint.fileio import CheckpointError
from tetrad.checkpoint.health import SaveAgreement, warn_if_no_room
from tetrad.checkpoint.manager import CheckpointManager
from tetrad.checkpoint.reader import CheckpointReader
from tetrad.checkpoint.rng import restore_rng, rng_pieces
from tetrad.checkpoint.writer import step_dirname
from tetrad.checkpoint.world import changed_world


def layout_of(engine) -> dict:
    """The world layout; RNG states are restored only when a checkpoint's layout equals it."""
    return engine.layout.record()


class TrainingCheckpoints:
    """The ``checkpoint`` config section applied to one Trainer's engine and sampler."""

    def __init__(self, config, engine, sampler):
        self.cfg, self.engine, self.sampler = config, engine, sampler
        self.section = config.checkpoint
        self.root = Path(config.checkpoint_dir)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        # There is a manager even with checkpoint.every 0: a preemption signal always saves.
        # It always writes in the background; `async: false` waits for each save at once.
        # Its failures are agreed across ranks (SaveAgreement) rather than raised on one.
        self.manager = CheckpointManager(
            self.root, rank=self.rank, world_size=self.world, keep=self.section.keep,
            async_save=True, layout=layout_of(engine), run_id=self._run_id(),
            commit_timeout=float(os.environ.get("TETRAD_CKPT_COMMIT_TIMEOUT", 600)),
            tolerate_failures=True)
        self.agreement = SaveAgreement(self.manager, self.rank, self.section.max_failures)
        if self.section.async_save:
            self._hook_optimizer_step()

    def _run_id(self) -> str:
        """One random id shared by every rank, so done markers from older attempts never count."""
        # os.urandom, not torch's RNG: drawing from it would change the training run's randomness
        ident = torch.tensor([int.from_bytes(os.urandom(7), "little")], dtype=torch.int64,
                             device=self.engine.device)
        dist.broadcast(ident, src=0)
        return f"{int(ident):x}"

    def _hook_optimizer_step(self) -> None:
        """The lazy part: the next change of any master waits for the snapshot, nothing before
        it does. The optimizer's own pre-step hook is that point in every step mode: an
        offloaded step that runs during backward (offload.step overlap) changes masters before
        the engine's step is reached."""
        wait = self.manager.wait_for_snapshot
        self.engine.optimizer.register_step_pre_hook(lambda *_: wait())

    # ------------------------------------------------------------------ resume
    def resume(self) -> int:
        """Load the checkpoint ``checkpoint.resume`` names, if any; returns the step it was saved at."""
        path = self._agree_on_path()
        if path is None:
            return 0
        reader = CheckpointReader(path)
        self.engine.load_state_pieces(reader)
        extra = reader.extra
        self.sampler.load_state_dict(extra["sampler"])
        if extra.get("scaler") and self.engine.scaler is not None:
            self.engine.scaler.load_state_dict(extra["scaler"])
        if reader.manifest.get("layout") == layout_of(self.engine):
            restore_rng(reader, self.rank)
        elif self.rank == 0:
            note = changed_world(reader, layout_of(self.engine), self.engine.grad_accum)
            print(f"tetrad: {note}", flush=True)
        if self.rank == 0:
            print(f"resumed from {path} at step {reader.step}", flush=True)
        return reader.step

    def _agree_on_path(self) -> Path | None:
        """Rank 0 chooses (verifying checksums once), every rank loads the same step."""
        resume = self.section.resume
        if resume == "none":
            return None
        step = torch.tensor([-1], dtype=torch.int64, device=self.engine.device)
        error = None
        if self.rank == 0:
            try:
                path = resolve_resume(resume, self.root)
                step[0] = -1 if path is None else CheckpointReader(path, verify_files=False).step
            except CheckpointError as e:
                error, step[0] = e, -2
        dist.broadcast(step, src=0)
        if int(step) == -2:
            raise error or CheckpointError(f"checkpoint.resume={resume!r}: rank 0 could not load it")
        if int(step) < 0:
            return None
        if resume == "auto":
            return self.root / step_dirname(int(step))
        given = Path(resume)
        return given if (given / "manifest.json").is_file() else given / step_dirname(int(step))

    # ------------------------------------------------------------------ save
    def after_step(self, step: int, force: bool = False) -> None:
        """Save at every ``checkpoint.every``-th step (after its optimizer step); ``force``
        saves now (preemption) unless this step was just saved. A collective on save steps."""
        every = self.section.every
        if not force and (every == 0 or step % every):
            return
        if self.manager.stats and self.manager.stats[-1]["step"] == step:
            return
        self.agreement.settle(self.engine.device)  # the previous save's outcome, on every rank
        if self.agreement.should_stop:
            return  # the loop stops after this step; a save now would only be thrown away
        pieces = self._state_pieces()
        extra = {"step": step, "sampler": self.sampler.state_dict(), "config": self.cfg.to_dict(),
                 "scaler": self.engine.scaler.state_dict() if self.engine.scaler is not None else None}
        self.manager.save(step, pieces + rng_pieces(self.rank), extra)
        if not self.section.async_save:
            self.finish()

    def finish(self) -> None:
        """Commit (or fail, agreed) the save in flight before the run ends or stops."""
        self.agreement.finish(self.engine.device)

    def check_room(self) -> None:
        """Before the first step: warn when the directory cannot hold one checkpoint."""
        warn_if_no_room(self.root, self._state_pieces() + rng_pieces(self.rank), self.engine.device, self.rank)

    def _state_pieces(self) -> list:
        return self.engine.state_pieces()

    def close(self, timeout: float | None = None) -> None:
        self.manager.close(timeout)
