"""Measurements of the machine and the model, for the strategy selector. Decides nothing.

    from tetrad.profiler import load_or_profile, ProfileOptions
    profile, reused = load_or_profile(model_args, "fp32", world=4)

A profile holds per-layer forward/backward time and activation bytes at every tp/sp shard
shape (several micro-batch sizes, each recompute policy), alpha-beta fits of every collective
per group size and placement, how much communication hides behind compute, how much slower
ranks sharing cores run when all compute at once (``contention``), AdamW time per parameter,
usable memory, host-device and disk bandwidth; see ``run.py`` for the layout.
"""

from tetrad.profiler.run import ProfileOptions, load_or_profile, measure, profile_world, shard_shapes
from tetrad.profiler.store import VERSION, default_path, load, save

__all__ = ["VERSION", "ProfileOptions", "default_path", "load", "load_or_profile", "measure",
           "profile_world", "save", "shard_shapes"]
