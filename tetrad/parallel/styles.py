"""The styles a plan applies: each turns a plain module into its parallel form (or adds an
input hook) given the layout's ``Layout`` view, and is a no-op where the layout does not need
it, so one table (``tetrad.parallel.plan``) serves tp, Megatron-SP, Ulysses, cp and their
mixes. Styles need only the module, so they work on a model still on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from tetrad.parallel.context import RingAttention
from tetrad.parallel.sequence import (SequenceParallelReplicated, ShardedPositions, UlyssesAttention,
                                      offset_rope_positions, region_input)
from tetrad.parallel.rng import ForkedRNG, RNGFork
from tetrad.parallel.tensor import (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding,
                                    VocabParallelHead)


class PlanError(ValueError):
    """The model cannot be laid out as the strategy asks."""


@dataclass
class Layout:
    """What the styles need to know, taken from the ``ResolvedLayout``: groups, degrees,
    whether Megatron-SP is active (``seq``), and the RNG forks."""

    tp_group: object
    sp_group: object
    tp: int
    sp: int
    seq: bool                # Megatron-SP active: activations sequence-sharded over tp
    rng_sharded: RNGFork     # data differs on every tp, sp and cp rank (heads, sequence shards)
    rng_sp: RNGFork          # replicated over tp, different over sp and cp (token shards)
    ties: dict = field(default_factory=dict)  # id(plain weight) -> its sharded replacement
    cp: int = 1
    cp_group: object = None
    cp_balance: bool = True
    kv_groups: int = 1       # query heads per key/value head (GQA)
    positions: Callable | None = None  # (n, device) -> positions of the rank's n local tokens
    traffic: object = None   # the layout's byte counter (tetrad.traffic.Traffic), or None

    @property
    def entry(self) -> str:
        return "gather" if self.seq else "copy"

    @property
    def token_sharded(self) -> bool:
        """Ranks of one replica hold different tokens between blocks (Ulysses or cp)."""
        return self.sp > 1 or self.cp > 1


Style = Callable[[nn.Module, Layout], nn.Module]


# ------------------------------------------------------------------ styles
def colwise(m, L):
    return ColumnParallelLinear(m, L.tp_group, "none") if L.tp > 1 else m


def colwise_entering(m, L):
    """Column-parallel that enters the tp region itself (no module-level hook did)."""
    return ColumnParallelLinear(m, L.tp_group, L.entry) if L.tp > 1 else m


def colwise_gather_output(m, L):
    return ColumnParallelLinear(m, L.tp_group, L.entry, gather_output=True) if L.tp > 1 else m


def colwise_gather_output_entered(m, L):
    """``colwise_gather_output`` inside a region its module already entered (Megatron-SP)."""
    return ColumnParallelLinear(m, L.tp_group, "none", gather_output=True) if L.tp > 1 else m


def packed_colwise_entered(m, L):
    return ColumnParallelLinear(m, L.tp_group, "none", parts=2) if L.tp > 1 else m


def packed_colwise(m, L):
    """A fused [gate; up] projection: each half split over ranks."""
    return ColumnParallelLinear(m, L.tp_group, L.entry, parts=2) if L.tp > 1 else m


def rowwise_split_input(m, L):
    return RowParallelLinear(m, L.tp_group, L.seq, split_input=True) if L.tp > 1 else m


def replicated_grad_sum(m, L):
    """A replicated module applied to rank-local data (Qwen3's per-head q/k norms): its
    gradients are summed over the tp group."""
    return SequenceParallelReplicated(m, L.tp_group) if L.tp > 1 else m


def rowwise(m, L):
    return RowParallelLinear(m, L.tp_group, L.seq) if L.tp > 1 else m


def colwise_conv1d(m, L):
    return ColumnParallelLinear(m, L.tp_group, "none", transposed=True) if L.tp > 1 else m


def fused_qkv_conv1d(m, L):
    return ColumnParallelLinear(m, L.tp_group, "none", transposed=True, parts=3) if L.tp > 1 else m


def rowwise_conv1d(m, L):
    return RowParallelLinear(m, L.tp_group, L.seq, transposed=True) if L.tp > 1 else m


def vocab_embedding(m, L):
    if L.tp == 1:
        return m
    if type(m).forward is not nn.Embedding.forward and not hasattr(m, "embed_scale"):
        raise PlanError(f"{type(m).__name__} changes nn.Embedding's forward; tetrad's vocab-parallel "
                        f"embedding knows only an `embed_scale` buffer. Add a style for it in "
                        f"tetrad/parallel/plan.py")
    new = VocabParallelEmbedding(m, L.tp_group, L.seq)
    L.ties[id(m.weight)] = new.weight
    return new


def vocab_head(m, L):
    if L.tp == 1:
        return m
    return VocabParallelHead(m, L.tp_group, L.entry, tied=L.ties.get(id(m.weight)))


def region(m, L):
    """Enter the tp region once for all of the module's column-parallel projections."""
    return region_input(m, L.entry, L.tp_group, L.traffic) if L.tp > 1 else m


def attention(m, L):
    region(m, L)
    if L.token_sharded and getattr(m, "use_rope", False):
        offset_rope_positions(m, L.positions)
    return m


def gpt2_attention(m, L):
    # HF GPT-2 splits c_attn's output with split_size = hidden size; locally it is hidden/tp.
    if L.tp > 1:
        m.split_size = m.split_size // L.tp
    return region(m, L)


def core(m, L):
    """Ring attention over cp inside Ulysses' all-to-all over sp (the hybrid "USP" layout:
    Ulysses hands the ring the whole cp-local sequence of heads/sp heads)."""
    if getattr(m, "p", 0.0) > 0 and (L.tp > 1 or L.token_sharded):
        m = ForkedRNG(m, L.rng_sharded)  # each rank's heads get their own mask
    if L.cp > 1:
        m = RingAttention(m, L.cp_group, balance=L.cp_balance, kv_groups=L.kv_groups)
    return UlyssesAttention(m, L.sp_group) if L.sp > 1 else m


def sharded_dropout(m, L):
    """Dropout between blocks: its own mask per rank wherever ranks hold different tokens."""
    if getattr(m, "p", 0.0) == 0:
        return m
    if L.seq:
        return ForkedRNG(m, L.rng_sharded)
    return ForkedRNG(m, L.rng_sp) if L.token_sharded else m


def sp_norm(m, L):
    return SequenceParallelReplicated(m, L.tp_group) if L.seq else m


def positions(m, L):
    if not L.token_sharded and not L.seq:
        return m
    return ShardedPositions(m, L.positions if L.token_sharded else None, L.tp_group if L.seq else None)
