"""Sequence parallelism, both kinds.

*Megatron-SP* (Korthikanti et al.) shards the activations *between* tensor-parallel regions
(norms, dropout, residual adds) along the sequence over the tp group: a region is entered by
all-gathering the sequence and left by reduce-scattering it, which moves the same bytes as
tp's all-reduce but divides the replicated activations (the 10sbh of sbh(10 + 24/t + ...))
by t. Parameters used on a sequence shard (norm gains, biases added after the reduce-scatter)
get only this shard's gradient, so they enter through ``copy_to_region`` and autograd hands
AccumulateGrad the tp-summed gradient; nothing hooks into gradient accumulation.

*Ulysses* (DeepSpeed, arXiv:2309.14509) runs on its own ``sp`` mesh axis: each rank holds
s/P tokens everywhere except inside attention, where an all-to-all swaps the sequence shard of
every head for the whole sequence of heads/P heads, so the attention core runs unchanged.
RoPE and learned positions must then follow the rank's tokens: with context parallelism too
(``tetrad.parallel.context``, which splits first) they are not even contiguous, so the
position of every local token comes from the layout (``ResolvedLayout.positions``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tetrad.parallel.comm import Counted, all_to_all, copy_to_region, scatter_to_sequence
from tetrad.parallel.tensor import enter_region

HEAD_DIM, SEQ_DIM_ATTN = 1, 2  # attention core tensors are [b, heads, s, hd]


class _KeepNames(nn.Module):
    """A wrapper that owns the wrapped module's parameters under their own names.

    The wrapped module is stored unregistered, so ``layers.0.attn_norm.weight`` stays
    ``layers.0.attn_norm.weight`` (checkpoints, ZeRO and optimizer groups key on names).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        object.__setattr__(self, "inner", module)
        for name, p in module.named_parameters(recurse=False):
            self.register_parameter(name, p)
        if any(True for _ in module.children()) or any(True for _ in module.buffers()):
            raise TypeError(f"{type(module).__name__} has submodules or buffers; it is not a leaf "
                            f"layer that sequence parallelism can wrap")


class SequenceParallelReplicated(Counted, _KeepNames):
    """A replicated layer (a norm) applied to a Megatron-SP sequence shard: its parameters
    pass through copy_to_region so their gradients are summed over the tp group."""

    def __init__(self, module: nn.Module, group):
        super().__init__(module)
        self.group = group

    def forward(self, *args, **kwargs):
        params = {n: copy_to_region(p, self.group, self.traffic) for n, p in self._parameters.items() if p is not None}
        return torch.func.functional_call(self.inner, params, args, kwargs)


class ShardedPositions(Counted, _KeepNames):
    """Learned position embedding for a sequence shard.

    Under Ulysses and context parallelism the local positions 0..n-1 become those of the
    rank's tokens (``positions(n, device)``: sp_rank*n .. sp_rank*n + n-1 for Ulysses alone);
    under Megatron-SP the output keeps only this tp rank's slice of them (backward
    all-gathers, so every rank gets the full gradient of the table).
    """

    def __init__(self, emb: nn.Embedding, positions=None, tp_group=None):
        super().__init__(emb)
        self.local_positions, self.tp_group = positions, tp_group

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if self.local_positions is not None:
            positions = self.local_positions(positions.shape[-1], positions.device)
        out = F.embedding(positions, self.weight)
        if self.tp_group is not None:
            out = scatter_to_sequence(out, self.tp_group, dim=out.dim() - 2, traffic=self.traffic)
        return out


def region_input(module: nn.Module, mode: str, group, traffic=None) -> nn.Module:
    """Enter a tensor-parallel region once per module (not once per projection): "copy" for
    plain tp, "gather" for Megatron-SP. Works on positional or ``hidden_states=`` input;
    ``traffic`` counts the entry's collectives (the module is the model's own, not ``Counted``)."""

    def hook(mod, args, kwargs):
        if args:
            return (enter_region(args[0], mode, group, traffic), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": enter_region(kwargs["hidden_states"], mode, group, traffic)}

    module.register_forward_pre_hook(hook, with_kwargs=True)
    return module


def offset_rope_positions(attn: nn.Module, positions) -> nn.Module:
    """Before each attention call, set ``attn.positions`` to the positions of the rank's n
    tokens its input holds (``positions(n, device)``; under Ulysses alone sp_rank*n ..
    sp_rank*n + n-1 of the sequence)."""

    def hook(mod, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        mod.positions = positions(x.shape[1], x.device)

    attn.register_forward_pre_hook(hook, with_kwargs=True)
    return attn


class UlyssesAttention(Counted, nn.Module):
    """Wraps an attention core on [b, heads, s/P, hd]: all-to-all to [b, heads/P, s, hd],
    the core on the whole sequence, all-to-all back. ``inner`` is the unchanged core, so
    selective recomputation of it repeats only local work, never the communication."""

    def __init__(self, inner: nn.Module, group):
        super().__init__()
        self.inner, self.group = inner, group

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **core_kwargs) -> torch.Tensor:
        world = dist.get_world_size(self.group)
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.shape[HEAD_DIM] % world:
                raise ValueError(f"Ulysses attention: {name} has {t.shape[HEAD_DIM]} heads on this rank, "
                                 f"not divisible by strategy.sp={world}")
        q, k, v = (all_to_all(t, self.group, HEAD_DIM, SEQ_DIM_ATTN, self.traffic) for t in (q, k, v))
        y = self.inner(q, k, v, **core_kwargs)
        return all_to_all(y, self.group, SEQ_DIM_ATTN, HEAD_DIM, self.traffic)
