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


# ------------------------------------------------------------------ names
# A checkpoint's tensor names, the one place they are spelled: every state a rank holds is
# saved under the plain model's parameter name, whatever the layout.
OPTIM_STEP = "optim/step"           # one scalar: every parameter has taken the same steps
STEP_COUNT = "engine/step_count"    # the engine's optimizer-step counter


def model_name(param: str) -> str:
    return f"model/{param}"


def optim_name(key: str, param: str) -> str:
    """Optimizer state ``key`` (``exp_avg``, ...) of parameter ``param``."""
    return f"optim/{key}/{param}"


def param_of(name: str) -> str | None:
    """The parameter a piece name belongs to (``model/X``, ``optim/<key>/X``), else None."""
    kind, _, rest = name.partition("/")
    if kind == "model":
        return rest
    if kind == "optim" and "/" in rest:
        return rest.partition("/")[2]
    return None


# ------------------------------------------------------------------ tensor-parallel boxes
@dataclass(frozen=True)
class TPShard:
    """Where a tensor-parallel parameter's local tensor sits in the logical (unsharded) one:
    the box ``global[offsets[d] : offsets[d] + local.shape[d]]`` of ``global_shape``. A fused
    projection whose shard is several boxes (HF GPT-2's ``c_attn``: q|k|v each split) is one
    box of ``global_shape`` once the local tensor is viewed as ``view``.

    Set on the parameter by ``tetrad.parallel.tensor`` (the one attribute ``tp_shard``) and
    read through ``tp_shard(p)``: ZeRO keys buckets and norms on it, checkpoints their boxes.
    """

    offsets: tuple[int, ...]
    global_shape: tuple[int, ...]
    view: tuple[int, ...] | None = None


def tp_shard(p: torch.Tensor) -> TPShard | None:
    """The parameter's tensor-parallel box, or None for a parameter tp does not split."""
    return getattr(p, "tp_shard", None)


def param_piece(name: str, tensor: torch.Tensor, p: torch.Tensor, flat_start: int, write: bool) -> Piece:
    """The piece for ``tensor``: flat elements from ``flat_start`` of parameter ``p``'s local
    tensor (its tp box when tensor parallelism splits it)."""
    box = tp_shard(p)
    if box is None:
        return Piece(name, tensor, tuple(p.shape), flat_start=flat_start, write=write)
    if box.view is None:
        return Piece(name, tensor, box.global_shape, box_offsets=box.offsets, box_shape=tuple(p.shape),
                     flat_start=flat_start, write=write)
    # The local tensor reshaped to `view` is a box of `global_shape`, the logical tensor with
    # one dim split in (parts, n): row-major order is the same in both frames.
    return Piece(name, tensor, _unsplit(tuple(p.shape), box.view, box.global_shape),
                 box_offsets=box.offsets, box_shape=box.view, flat_start=flat_start,
                 write=write, frame=box.global_shape)


def _unsplit(local: tuple, view: tuple, frame: tuple) -> tuple:
    """The logical global shape: ``frame`` with the dim that ``view`` splits (relative to the
    local shape) merged back."""
    d = next((i for i, (a, b) in enumerate(zip(local, view)) if a != b), len(local) - 1)
    return frame[:d] + (frame[d] * frame[d + 1],) + frame[d + 2:]


def mark_stage_replica(p: torch.Tensor) -> torch.Tensor:
    """Mark ``p`` as a pipeline stage's copy of a parameter another stage owns (the tied
    embedding on the last stage): one tensor in checkpoints, counted once in the grad norm."""
    p.stage_replica = True
    return p


def is_stage_replica(p: torch.Tensor) -> bool:
    return bool(getattr(p, "stage_replica", False))


def mark_writers(pieces: list[Piece], model, *, tp_rank: int, world_rank: int) -> list[Piece]:
    """Make the write flags say "one writer per element across the whole world".

    ZeRO already dedupes over its own (dp, or dp x cp x sp) group. On top of that: a
    parameter that tensor parallelism does not shard is the same on every tp rank (tp rank 0
    writes it); pipeline stages hold disjoint parameters (each writes its own) except a stage
    replica (the tied embedding's copy on the last stage: the first stage writes it); pieces
    that belong to no parameter (``optim/step``, ``engine/step_count``) are the same
    everywhere (world rank 0).
    """
    params = dict(model.named_parameters())
    sharded = {n for n, p in params.items() if tp_shard(p) is not None}
    replicas = {n for n, p in params.items() if is_stage_replica(p)}
    for piece in pieces:
        param = param_of(piece.name)
        if param is None:
            piece.write = world_rank == 0
        elif param in replicas or (tp_rank != 0 and param not in sharded):
            piece.write = False
    return pieces
