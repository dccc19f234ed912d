"""Optimizer *builders*: how to construct the optimizer again over other tensors.

ZeRO never steps the user's parameters directly: it steps fp32 master shards. So rather than
subclassing optimizers (one class per stage), every stage asks a builder for a fresh
optimizer over its shards, as nanotron does. A builder comes from the ``optimizer`` config
section (tetrad's AdamW) or from an optimizer instance the user already made: its class,
constructor defaults and per-group hyperparameters (weight decay per group included) are
read and replayed over the shards.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import nn

from tetrad.config.schema import OptimizerConfig
from tetrad.zero.optim import build_adamw, param_groups

Builder = Callable[[list[dict]], torch.optim.Optimizer]


def optimizer_template(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                       optim_cfg: OptimizerConfig | None) -> tuple[list[dict], Builder]:
    """([{"params": model params, **hyperparameters}, ...], builder(groups over shards))."""
    if optimizer is None:
        cfg = optim_cfg or OptimizerConfig()
        groups = param_groups(model.named_parameters(), cfg.weight_decay)
        return groups, lambda shard_groups: build_adamw(shard_groups, cfg)
    if optimizer.state:
        raise ValueError("the optimizer given to tetrad has already taken steps; pass a fresh "
                         "optimizer (its state cannot be mapped onto ZeRO shards)")
    cls = type(optimizer)
    # Only what the constructor takes: some defaults are derived (AdamW's
    # decoupled_weight_decay), and per-group values travel with the groups anyway.
    accepted = inspect.signature(cls.__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    groups = [dict(g) for g in optimizer.param_groups]
    return groups, lambda shard_groups: cls(shard_groups, **defaults)


def group_options(groups: list[dict]) -> list[dict]:
    """Each group's hyperparameters without its parameters."""
    return [{k: v for k, v in g.items() if k != "params"} for g in groups]
