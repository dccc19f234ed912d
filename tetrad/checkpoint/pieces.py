"""``Piece``: one rank's part of one logical tensor — the unit of save, load and reshard.

A logical tensor is named independently of the layout (``model/layers.0.attn.q_proj.weight``,
``optim/exp_avg/layers.0.attn.q_proj.weight``, ...) and has a global shape. A rank holds a
rectangular *box* of it (tensor parallelism splits along a dim), and of that box possibly
only a contiguous range of its row-major flattened elements (ZeRO's flat shards cut across
rows). Describing every holding as (box, flat range) covers tp, sp, dp, ZeRO and pipeline
layouts with one rule, so a checkpoint saved under one layout can fill the pieces that any
other layout asks for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Piece:
    """``tensor`` holds flat elements [flat_start, flat_start + tensor.numel()) of the box
    global[box_offsets[d] : box_offsets[d] + box_shape[d] for each dim d]."""

    name: str
    tensor: torch.Tensor
    global_shape: tuple[int, ...]
    box_offsets: tuple[int, ...] | None = None  # None: the box is the whole tensor
    box_shape: tuple[int, ...] | None = None
    flat_start: int = 0
    write: bool = True  # False on ranks whose identical replica another rank writes
    # The shape the box refers to when it is not global_shape: a reshape of the logical tensor
    # (same row-major order) in which the holding is one box, e.g. GPT-2's fused q|k|v
    # [in, 3*h] seen as [in, 3, h] under tp. None: the box is in global_shape itself.
    frame: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        self.global_shape = tuple(int(d) for d in self.global_shape)
        if self.frame is not None:
            self.frame = tuple(int(d) for d in self.frame)
            if math.prod(self.frame) != math.prod(self.global_shape):
                raise ValueError(f"piece {self.name}: frame {self.frame} is not a reshape of "
                                 f"{self.global_shape}")
            if self.frame == self.global_shape:
                self.frame = None
        if self.box_offsets is None:
            self.box_offsets = (0,) * len(self.box_frame)
        if self.box_shape is None:
            self.box_shape = self.box_frame
        self.box_offsets = tuple(int(d) for d in self.box_offsets)
        self.box_shape = tuple(int(d) for d in self.box_shape)
        if self.flat_start + self.tensor.numel() > math.prod(self.box_shape):
            raise ValueError(f"piece {self.name}: flat range [{self.flat_start}, "
                             f"{self.flat_start + self.tensor.numel()}) exceeds box {self.box_shape}")

    @property
    def box_frame(self) -> tuple[int, ...]:
        """The shape the box coordinates refer to."""
        return self.global_shape if self.frame is None else self.frame

    @property
    def numel(self) -> int:
        return self.tensor.numel()

    @property
    def is_full(self) -> bool:
        """True when the piece is the whole logical tensor."""
        return self.box_shape == self.box_frame and self.flat_start == 0 and \
            self.numel == math.prod(self.global_shape)
