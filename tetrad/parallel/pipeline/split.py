"""Stage split: which layers each pipeline chunk runs, and pruning the model to this rank's.

The model keeps the plain model's module tree and parameter *names* (``layers.5.attn...`` stays
``layers.5.attn...`` on the rank that holds layer 5) because checkpoints, tensor-parallel
plans and the recompute policies all key on names. Layers this rank does not run are dropped
(embedding and head modules set to ``None``). Prune a model built on the meta device, then
``materialize`` it: only this stage's parameters are ever allocated, and because tetrad's init
is per parameter name (``tetrad.models.init_parameter``) they get exactly the whole model's
values. A model built whole can be pruned too (the engine accepts both; Hugging Face models
always are).

Which modules are the embedding, the blocks and the head is the model family's
``StageView`` (``stages``): tetrad's Transformer, Hugging Face models from their
``base_model_pp_plan``, GPT-2 by names.

Tied input/output embeddings: the last stage keeps the embedding module that owns the tied
weight (never calling it), so its head's weight keeps the embedding's name and values;
``stage_replicas`` names that copy, whose gradient the engine sums with the first stage's
(``TiedWeights``) and which neither the checkpoint nor the gradient norm counts twice.

Where the layers go: ``strategy.pp_split`` (explicit boundaries), else ``balanced_partition``
of each layer's modelled cost with the embedding charged to the first chunk and the output
layer to the last (``modelled_costs``: matmul FLOPs from the parameter counts, so uneven
blocks and a large vocabulary move the boundaries), or of measured costs (``measure_costs``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from tetrad.parallel.pipeline.actions import Placement
from tetrad.parallel.pipeline.stages import StageView, _get, stage_view
from tetrad.parallel.pipeline.trace import clock


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


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def modelled_costs(model: nn.Module, seq_len: int) -> tuple[list[float], float, float]:
    """(per-layer, embedding, head) forward FLOPs per token from the live (maybe meta)
    model's shapes: 2 per weight of a block's matmuls plus 4 s h for its attention core; the
    output projection 2 V h (counted whole even when its weight is the embedding's); the
    embedding a lookup, 2 h per table (its cost is memory, not FLOPs, and small)."""
    view = stage_view(model)
    out_proj = _get(model, view.head[-1])
    width = out_proj.weight.shape[-1]
    layers = [2.0 * _numel(b) + 4.0 * seq_len * width for b in view.blocks(model)]
    tables = [m for m in (_get(model, e) for e in view.embed) if isinstance(m, nn.Embedding)]
    head = 2.0 * out_proj.weight.numel() + sum(2.0 * _numel(_get(model, h)) for h in view.head[:-1])
    return layers, 2.0 * width * len(tables), head


def partition(model: nn.Module, n_chunks: int, seq_len: int, boundaries: Sequence[int] | None = None) -> list[range]:
    """Each chunk's layers: the explicit ``boundaries`` (strategy.pp_split), else balanced
    on ``modelled_costs``."""
    n = len(stage_view(model).blocks(model))
    if boundaries:
        edges = [0, *boundaries, n]
        if len(edges) != n_chunks + 1 or any(a >= b for a, b in zip(edges, edges[1:])):
            raise ValueError(f"strategy.pp_split={list(boundaries)}: need {n_chunks - 1} increasing layer "
                             f"boundaries inside 1..{n - 1}")
        return [range(a, b) for a, b in zip(edges, edges[1:])]
    layers, embed, head = modelled_costs(model, seq_len)
    return balanced_partition(layers, n_chunks, embed, head)


@torch.no_grad()
def measure_costs(model: nn.Module, input_ids: torch.Tensor, reps: int = 3) -> tuple[list[float], float, float]:
    """(per-layer, embedding, head) forward seconds on ``input_ids``, minimum of ``reps`` runs
    (on an accelerator the clock waits for the kernels, else it would time their launch)."""
    now = clock(input_ids.device)

    def timed(fn, x):
        times = []
        for _ in range(reps):
            t = now()
            y = fn(x)
            times.append(now() - t)
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

    def __init__(self, model: nn.Module, index: int, n_chunks: int, layers: Sequence[nn.Module],
                 view: StageView | None = None):
        self.model, self.index, self.layers = model, index, list(layers)
        self.is_first, self.is_last = index == 0, index == n_chunks - 1
        self.view = view or stage_view(model)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.view.run(self.model, self.layers, x, self.is_first, self.is_last)

    def parameters(self) -> list[nn.Parameter]:
        """The parameters this chunk's passes use: its layers', and the embedding's (first)
        or the head's (last; with tied embeddings that includes the embedding weight). Read
        when asked, so modules that tensor parallelism replaced are the ones found."""
        paths = (self.view.embed if self.is_first else ()) + (self.view.head if self.is_last else ())
        modules = self.layers + [m for m in (_get(self.model, p) for p in paths) if m is not None]
        seen: dict[int, nn.Parameter] = {}
        for module in modules:
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())


def split_model(model: nn.Module, rank: int, p: int, v: int = 1, ranges: list[range] | None = None,
                placement: Placement | None = None) -> list[Chunk]:
    """Prune ``model`` in place to pipeline rank ``rank``'s chunks (``placement``: default the
    looping one, global chunks rank, rank+p, ...); returns them in local order. ``ranges``
    (default even) gives each global chunk's layers."""
    view = stage_view(model)
    place = placement or Placement(p, v)
    n_chunks = place.n_chunks
    layers = list(view.blocks(model))
    ranges = ranges or even_partition(len(layers), n_chunks)
    mine = [place.global_of(rank, c) for c in range(place.v)]
    keep = {i: layers[i] for c in mine for i in ranges[c]}
    first, last = 0 in mine, n_chunks - 1 in mine
    tied = view.is_tied(model)
    view.set_blocks(model, StageLayers(keep))
    _drop(model, [e for e in view.embed if not first and not (tied and last and e == view.tied)])
    _drop(model, view.head if not last else ())
    # Every rank records whether the first and last stage share a weight (their sum of its
    # gradients needs a process group that every rank must help create).
    model.pipeline_tied = tied and place.rank_of(0) != place.rank_of(n_chunks - 1)
    model.stage_replicas = _replicas(model, view) if tied and last and not first else []
    model.stage_ties = _replicas(model, view) if tied and first != last else []
    return [Chunk(model, c, n_chunks, [layers[i] for i in ranges[c]], view) for c in mine]


def _replicas(model: nn.Module, view: StageView) -> list[str]:
    module = _get(model, view.tied)
    prefix = view.tied + "."
    return [prefix + n for n, _ in module.named_parameters()] if module is not None else []


def stage_replicas(model: nn.Module) -> list[str]:
    """Names of the parameters this stage holds only as a copy of another stage's (the tied
    embedding on the last stage); [] when none (or the model was not split)."""
    return list(getattr(model, "stage_replicas", []))


def stage_ties(model: nn.Module) -> list[str]:
    """Names of the tied parameters this stage shares with another stage (the first and the
    last stage both list the tied embedding); [] when both chunks are on one rank."""
    return list(getattr(model, "stage_ties", []))


def _drop(model: nn.Module, names: Sequence[str]) -> None:
    for name in names:
        parent, _, attr = name.rpartition(".")
        owner = _get(model, parent) if parent else model
        if owner is not None and getattr(owner, attr, None) is not None:
            setattr(owner, attr, None)
