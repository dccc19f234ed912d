"""The global gradient norm, exact whatever the layout.

Each rank squares only the gradient elements it owns. ZeRO shards are disjoint across the
dp group, so their squares are summed there (replicated stage-0 gradients are not). Tensor-
parallel parameters (``tensor_parallel=True``) hold different elements on each tp rank and
are summed over tp; the others are identical across tp and counted once. Pipeline stages own
different layers and are summed over pp. The groups come in as arguments: this module knows
nothing of the mesh; so does the byte counter the sums are told to (``norm_groups["traffic"]``,
a ``tetrad.traffic.Traffic``, or absent).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tetrad.traffic import count
from tetrad.zero.flat import FlatGroup


CHUNK = 1 << 20  # elements per fp64 partial sum on the CPU
DEVICE_CHUNK = 1 << 26  # on an accelerator: a few large kernels per bucket, not thousands


def squares64(t: torch.Tensor) -> torch.Tensor:
    """The sum of squares of ``t`` in fp64, one chunk at a time.

    ``vector_norm(t, dtype=float64)`` converts the whole tensor to fp64 first: for a
    100M-element bucket that is an 800 MB temporary and 0.5-2 s on this 2-core machine,
    spent once per bucket per step. Chunks of 1M elements give the same sum to ~1e-12 in
    about a fifth of the time, with an 8 MB temporary. On an accelerator the same small
    chunks would mean ~1000 tiny kernels per 1 B parameters per step: there they are 64M
    elements (a 512 MB fp64 temporary at most, on a device that has tens of GB).
    """
    flat = t.reshape(-1)
    chunk = CHUNK if flat.device.type == "cpu" else DEVICE_CHUNK
    if flat.numel() <= chunk:
        return torch.linalg.vector_norm(flat, dtype=torch.float64) ** 2
    parts = [torch.linalg.vector_norm(c, dtype=torch.float64) for c in flat.split(chunk)]
    return torch.linalg.vector_norm(torch.stack(parts)) ** 2


def global_grad_norm(groups: list[FlatGroup], grads: list[torch.Tensor], *, sharded: bool,
                     dp_group, norm_groups: dict | None, device: torch.device) -> torch.Tensor:
    """sqrt of the sum of squares of every gradient of the model, as an fp64 scalar on
    ``device`` (the compute device even for a rank that holds no gradient: the reductions run
    on every rank, and NCCL reduces device tensors only)."""
    sq = torch.zeros(2, dtype=torch.float64, device=device)  # [tensor-parallel, replicated]
    for g, grad in zip(groups, grads):
        if grad.numel() and g.counted:  # a stage replica's squares are its owner's
            sq[0 if g.tensor_parallel else 1] += squares64(grad)
    return reduce_squares(sq, sharded=sharded, dp_group=dp_group, norm_groups=norm_groups)


def reduce_squares(sq: torch.Tensor, *, sharded: bool, dp_group, norm_groups: dict | None) -> torch.Tensor:
    """The global norm from this rank's fp64 squares [tensor-parallel, replicated]. Split out
    of global_grad_norm for tetrad.offload, which squares gradient shards as they stream to
    their tier and so never has them all at once."""
    norm_groups = norm_groups or {}
    traffic = norm_groups.get("traffic")
    if sharded and dp_group is not None and dist.get_world_size(dp_group) > 1:
        count(traffic, "all_reduce", dp_group, sq.numel() * sq.element_size())
        dist.all_reduce(sq, group=dp_group)
    tp_part = sq[:1].clone()
    if norm_groups.get("tp") is not None:
        count(traffic, "all_reduce", norm_groups["tp"], tp_part.element_size())
        dist.all_reduce(tp_part, group=norm_groups["tp"])
    total = tp_part[0] + sq[1]
    if norm_groups.get("pp") is not None:
        count(traffic, "all_reduce", norm_groups["pp"], total.element_size())
        dist.all_reduce(total, group=norm_groups["pp"])
    return total.sqrt()


def clip_(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale gradients in place so their global norm is at most ``max_norm`` (torch's rule)."""
    if max_norm <= 0:
        return
    coef = max_norm / (float(norm) + 1e-6)
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)
