"""What a resume under another world or layout keeps and what it changes, in one sentence.

A job restarted on fewer or more ranks (a lost node, ``torchrun --nnodes 1:2``) loads the
checkpoint through the reshard (every piece is found by name and box, whatever the layout
that wrote it) and keeps ``run.global_batch_size``: the engine recomputes the gradient
accumulation for the new data-parallel degree, so the loss curve continues. Whether the
new world *can* keep the batch is checked with the config, before any process group
(``tetrad.config.validate``), and the error there names the world sizes that can.
"""

from __future__ import annotations

_KEYS = ("dp", "tp", "pp", "sp", "zero")


def _layout(layout: dict) -> str:
    degrees = " ".join(f"{k}={layout[k]}" for k in _KEYS if k in layout)
    return f"world size {layout.get('world_size', '?')} ({degrees})"


def _accumulation(layout: dict, config: dict) -> int | None:
    """Micro-batches per dp rank per step in the run that saved (from its config and layout)."""
    try:
        batch = int(config["run"]["global_batch_size"])
        mbs = int(config["strategy"]["micro_batch_size"])
        return batch // (int(layout["dp"]) * mbs)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


def changed_world(reader, now: dict, accumulation: int) -> str:
    """Rank 0's line when the checkpoint's layout differs from this run's."""
    saved, config = reader.manifest.get("layout") or {}, reader.extra.get("config") or {}
    before = _accumulation(saved, config)
    batch = config.get("run", {}).get("global_batch_size", "?")
    accum = f"{before} -> {accumulation}" if before is not None and before != accumulation else f"{accumulation}"
    return (f"resuming step {reader.step} saved by {_layout(saved)} on {_layout(now)}: resharded; the global "
            f"batch stays {batch} sequences per step (gradient accumulation {accum} micro-batch(es) per dp "
            f"rank); RNG states (dropout) start fresh for the new layout")
