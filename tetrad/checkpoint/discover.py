"""Choosing the checkpoint to resume from: the newest one that is committed and intact."""

from __future__ import annotations

import warnings
from pathlib import Path

from tetrad.checkpoint.fileio import CheckpointError
from tetrad.checkpoint.reader import load_manifest, verify
from tetrad.checkpoint.writer import committed_steps, step_dirname


def problems(path: Path) -> list[str]:
    """What is wrong with checkpoint ``path`` (empty when its manifest and every checksum are good)."""
    try:
        manifest = load_manifest(path)
    except CheckpointError as e:
        return [str(e)]
    return [f"{path / name}: {bad}" for name, bad in verify(path, manifest).items() if bad]


def latest_intact(root: str | Path) -> Path | None:
    """The newest committed checkpoint under ``root`` whose files verify, or None.

    Newer ones that fail are skipped with a warning naming the bad file, so a crash or a
    corrupted disk block costs the steps since the previous checkpoint, not the run.
    """
    root = Path(root)
    for step in reversed(committed_steps(root)):
        path = root / step_dirname(step)
        bad = problems(path)
        if not bad:
            return path
        warnings.warn(f"checkpoint {path} is unusable ({'; '.join(bad)}); trying an older one",
                      stacklevel=2)
    return None


def resolve_resume(resume: str, root: str | Path) -> Path | None:
    """The checkpoint the ``checkpoint.resume`` setting names: 'none' -> None, 'auto' -> the newest
    intact one under ``root`` (None when there is none), else that path (which must be intact)."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_intact(root)
    path = Path(resume)
    if path.is_dir() and not (path / "manifest.json").exists() and committed_steps(path):
        found = latest_intact(path)  # a checkpoint root rather than one checkpoint
        if found is None:
            raise CheckpointError(f"checkpoint.resume={resume!r}: no intact checkpoint in it")
        return found
    bad = problems(path)
    if bad:
        raise CheckpointError(f"checkpoint.resume={resume!r} cannot be loaded: {'; '.join(bad)}")
    return path
