"""Stage split: which layers each pipeline chunk runs, and pruning the model to this rank's.

The model keeps the plain model's module tree and parameter *names* (``layers.5.attn...`` stays
``layers.5.attn...`` on the rank that holds layer 5) because checkpoints, tensor-parallel
plans and the recompute policies all key on names. Layers this rank does not run are dropped
(embedding and head modules set to ``None``). Prune a model built on the meta device, then
``materialize`` it: only this stage's parameters are ever allocated, and because tetrad's init
is per parameter name (``tetrad.models.init_parameter``) they get exactly the whole model's
values. A model built whole can be pruned too (the engine accepts both).

The model must expose ``embed(input_ids)``, ``layers`` and ``head(h)`` -- tetrad's
``Transformer`` does; Hugging Face adapters do not yet.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch
from torch import nn

EMBED_MODULES = ("tok_emb", "pos_emb")
HEAD_MODULES = ("norm", "lm_head")


def even_partition(n_layers: int, n_chunks: int) -> list[range]:
    """Contiguous layer ranges, sizes differing by at most one (earlier chunks get the extra
    layers: the last chunk also runs the output head, usually the costliest piece)."""
    if n_layers < n_chunks:
        raise ValueError(f"model.n_layers={n_layers} < pp*virtual_stages={n_chunks}: every "
                         f"pipeline chunk needs at least one layer")
    base, extra = divmod(n_layers, n_chunks)
    bounds = [0]
    for c in range(n_chunks):
        bounds.append(bounds[-1] + base + (c < extra))
    return [range(bounds[c], bounds[c + 1]) for c in range(n_chunks)]


def balanced_partition(layer_costs: Sequence[float], n_chunks: int, embed_cost: float = 0.0,
                       head_cost: float = 0.0) -> list[range]:
    """Contiguous ranges minimising the costliest chunk, embedding charged to the first chunk
    and the head to the last (dynamic programming over split points, O(chunks · layers²))."""
    n = len(layer_costs)
    even_partition(n, n_chunks)  # same validation
    costs = list(layer_costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(c: int, lo: int, hi: int) -> float:
        return prefix[hi] - prefix[lo] + (embed_cost if c == 0 else 0) + (head_cost if c == n_chunks - 1 else 0)

    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(n_chunks + 1)]
    cut = [[0] * (n + 1) for _ in range(n_chunks + 1)]
    best[0][0] = 0.0
    for c in range(1, n_chunks + 1):
        for hi in range(c, n + 1):
            for lo in range(c - 1, hi):
                val = max(best[c - 1][lo], cost(c - 1, lo, hi))
                if val < best[c][hi]:
                    best[c][hi], cut[c][hi] = val, lo
    ranges, hi = [], n
    for c in range(n_chunks, 0, -1):
        lo = cut[c][hi]
        ranges.append(range(lo, hi))
        hi = lo
    return ranges[::-1]


@torch.no_grad()
def measure_costs(model: nn.Module, input_ids: torch.Tensor, reps: int = 3) -> tuple[list[float], float, float]:
    """(per-layer, embedding, head) forward seconds on ``input_ids``, minimum of ``reps`` runs."""
    def timed(fn, x):
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            y = fn(x)
            times.append(time.perf_counter() - t)
        return y, min(times)

    h, embed = timed(model.embed, input_ids)
    layer_costs = []
    for layer in model.layers:
        h, t = timed(layer, h)
        layer_costs.append(t)
    _, head = timed(model.head, h)
    return layer_costs, embed, head


class StageLayers(nn.ModuleList):
    """The layers a pipeline rank holds, registered under their indices in the whole model
    (so ``layers.5`` keeps its name); iterating yields them in model order, and ``[i]`` is the
    i-th *held* layer. A ``ModuleList``, so code that finds a model's blocks by type (e.g.
    recomputation, applied after the split) sees it as one."""

    def __init__(self, layers: dict[int, nn.Module]):
        super().__init__()
        for i in sorted(layers):
            self.add_module(str(i), layers[i])

    def __getitem__(self, idx):
        held = list(self._modules.values())
        return nn.ModuleList(held[idx]) if isinstance(idx, slice) else held[idx]

    def __iter__(self):
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)


class Chunk:
    """One pipeline chunk: the first runs the embedding, the last the head; all run layers.

    Not an ``nn.Module``: its parameters belong to (and are named by) the pruned model.
    """

    def __init__(self, model: nn.Module, index: int, n_chunks: int, layers: Sequence[nn.Module]):
        self.model, self.index, self.layers = model, index, list(layers)
        self.is_first, self.is_last = index == 0, index == n_chunks - 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model.embed(x) if self.is_first else x
        for layer in self.layers:
            h = layer(h)
        return self.model.head(h) if self.is_last else h


def split_model(model: nn.Module, rank: int, p: int, v: int = 1,
                ranges: list[range] | None = None) -> list[Chunk]:
    """Prune ``model`` in place to pipeline rank ``rank``'s chunks (global chunks rank, rank+p,
    ...); returns them in local order. ``ranges`` (default even) gives each global chunk's layers."""
    if getattr(model.args, "tie_embeddings", False) if hasattr(model, "args") else False:
        raise ValueError("model.tie_embeddings=true with strategy.pp > 1 is not supported yet: the "
                         "first and last stages would need their shared weight's gradients summed; "
                         "set model.tie_embeddings=false or strategy.pp=1")
    for attr in ("embed", "layers", "head"):
        if not hasattr(model, attr):
            raise TypeError(f"pipeline parallelism needs a model with embed/layers/head (tetrad's "
                            f"Transformer); {type(model).__name__} has no {attr!r}")
    n_chunks = p * v
    layers = list(model.layers)
    ranges = ranges or even_partition(len(layers), n_chunks)
    mine = [c * p + rank for c in range(v)]
    keep = {i: layers[i] for c in mine for i in ranges[c]}
    model.layers = StageLayers(keep)
    _drop(model, EMBED_MODULES if rank != 0 else ())
    _drop(model, HEAD_MODULES if (n_chunks - 1) not in mine else ())
    return [Chunk(model, c, n_chunks, [layers[i] for i in ranges[c]]) for c in mine]


def _drop(model: nn.Module, names: Sequence[str]) -> None:
    for name in names:
        if getattr(model, name, None) is not None:
            setattr(model, name, None)
