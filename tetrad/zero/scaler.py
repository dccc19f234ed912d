"""Dynamic loss scaling for fp16 (Micikevicius et al.): skip, do not crash, on overflow.

fp16 gradients underflow below 6e-8, so the loss is multiplied by a large scale before
backward and the fp32 master gradients are divided by it again. When any gradient is inf or
nan (detected from the global grad norm, which is already all-reduced over every group, so
every rank agrees) the step is skipped and the scale halves; after ``growth_interval`` clean
steps it doubles. Values follow torch.amp.GradScaler's defaults.
"""

from __future__ import annotations

import torch


class DynamicLossScaler:
    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, min_scale: float = 1.0):
        self.scale = float(init_scale)
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.min_scale = growth_interval, min_scale
        self.good_steps = 0
        self.skipped_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def update(self, overflow: bool) -> None:
        if overflow:
            self.scale = max(self.min_scale, self.scale * self.backoff_factor)
            self.good_steps = 0
            self.skipped_steps += 1
            return
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= self.growth_factor

    def get_scale(self) -> float:
        """Same name as torch.amp.GradScaler's, for code that logs it."""
        return self.scale

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state.get("good_steps", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
