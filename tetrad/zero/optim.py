"""Optimizer construction and the learning-rate schedule.

AdamW is torch's own: the fused kernel where the device has one (CPU included since 2.4),
otherwise foreach. Weight decay applies to matrices and embeddings only, not to biases and
norm gains, as in GPT-2/Megatron.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from tetrad.zero.compact import CompactAdamW


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(groups: list[dict], cfg) -> torch.optim.Optimizer:
    """AdamW from an ``optimizer`` config section; fused when every parameter allows it, or
    with bf16 moments (``state_dtype: bf16``, tetrad.zero.compact)."""
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if getattr(cfg, "state_dtype", "fp32") == "bf16":
        return CompactAdamW(groups, **kwargs)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError):
        # fused needs floating-point tensors on a supported device; foreach is the fallback.
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


def lr_at(step: int, cfg, total_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then the schedule."""
    base = cfg.lr
    if step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return base
    span = max(1, total_steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    floor = base * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return base - (base - floor) * frac
    return floor + 0.5 * (base - floor) * (1 + math.cos(math.pi * frac))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
