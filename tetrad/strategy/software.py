"""How a training framework runs a layout, where that changes the time or the memory of a step.

The planner prices tetrad's own engine (``TETRAD``); published runs of other frameworks
(``tetrad/strategy/published``) state their own, each field read from that framework's code or
paper, so that the cost model prices what they ran rather than what tetrad would run. None of
these is fitted: kernel efficiency is the accelerator's (``tetrad.strategy.calibrate``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ATTENTION_KERNELS = ("flash", "math")


@dataclass(frozen=True)
class Software:
    name: str = "tetrad"
    attention: str = "flash"            # flash: fused SDPA, no s x s scores; math: materialised
    # Peak bytes per logit of the loss on the last stage. tetrad: the bf16 logits (2, held by
    # the engine until backward), the fp32 log-softmax output (4, saved), and in its backward
    # the fp32 gradients of both (4 + 4): F.cross_entropy(logits.float()) (tetrad.models.loss).
    loss_bytes_per_logit: float = 14.0
    grad_bytes: int | None = None       # bytes of a gradient per parameter; None: the compute dtype
    grad_reduce_bytes: int | None = None  # element size gradients are reduced in; None: grad_bytes
    gather_bytes: int | None = None     # element size ZeRO-3 all-gathers parameters in; None: dtype
    zero3_prefetch: int = 1             # units gathered ahead of the one computing
    grad_overlap: bool = True           # gradient reduction overlaps the last backward
    # ZeRO-2/3 gradients: tetrad accumulates full-size gradients over the step's micro-batches
    # and reduce-scatters once (tetrad.zero.grads); FSDP reduce-scatters every micro-batch and
    # accumulates the shard.
    reduce_every_micro_batch: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"software.attention={self.attention!r}; valid: {ATTENTION_KERNELS}")

    @classmethod
    def from_dict(cls, raw: dict, where: str = "software") -> "Software":
        """A Software from a mapping; unknown keys or wrong types fail naming ``where.key``."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in raw.items():
            if key not in known:
                raise ValueError(f"{where}.{key}: unknown key; valid: {sorted(known)}")
            kwargs[key] = _typed(key, value, f"{where}.{key}")
        try:
            return cls(**kwargs)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


def _typed(key: str, value, where: str):
    if key in ("name", "attention"):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}={value!r}: must be a non-empty string")
        return value
    if key in ("grad_overlap", "reduce_every_micro_batch"):
        if not isinstance(value, bool):
            raise ValueError(f"{where}={value!r}: must be true or false")
        return value
    if key in ("grad_bytes", "grad_reduce_bytes", "gather_bytes"):
        if value is not None and value not in (1, 2, 4):
            raise ValueError(f"{where}={value!r}: must be 1, 2, 4 or null")
        return value
    if key == "zero3_prefetch":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}={value!r}: must be an integer >= 0")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"{where}={value!r}: must be a number > 0")
    return float(value)


TETRAD = Software()
