"""Choose none / selective / full per layer so the layers' activations fit a memory budget.

Cost model (relative units of one layer's forward): full recomputes the whole layer (1.0);
selective recomputes the attention core, whose share of a layer's forward FLOPs is
4s^2bh / (24sbh^2 + 4s^2bh) = s / (6h + s) (Korthikanti et al.); none costs nothing. Among the
assignments that fit, the cheapest wins; ties go to fewer recomputed layers, then fewer full
ones. Recomputed layers are the first ones (Megatron's "block" method), so the choice is
deterministic and the same on every rank.
"""

from __future__ import annotations

from bisect import bisect_left
from itertools import accumulate

from tetrad.config import ConfigError


def attention_core_share(seq_len: int, d_model: int) -> float:
    """Fraction of a layer's forward FLOPs spent in the attention core."""
    return seq_len / (6 * d_model + seq_len)


def default_costs(seq_len: int, d_model: int) -> dict[str, float]:
    return {"none": 0.0, "selective": attention_core_share(seq_len, d_model), "full": 1.0}


def _by_saving(memories: list[dict[str, int]], idx: list[int], policy: str) -> list[int]:
    # Stable sort: equal savings keep layer order, so identical layers recompute the first ones.
    return sorted(idx, key=lambda i: -(memories[i]["none"] - memories[i][policy]))


def _fewest_selective(memories, rest: list[int], base: int, budget: int) -> int | None:
    """Fewest of ``rest`` (by largest saving) to make selective so the total fits, or None."""
    order = _by_saving(memories, rest, "selective")
    savings = [memories[i]["none"] - memories[i]["selective"] for i in order]
    prefix = [0, *accumulate(max(sv, 0) for sv in savings)]
    need = base - budget
    k = bisect_left(prefix, need)
    return k if k < len(prefix) else None


def plan_budget(memories: list[dict[str, int]], budget_bytes: int,
                costs: dict[str, float]) -> list[str]:
    """Per-layer policies (a list as long as ``memories``) that fit ``budget_bytes``.

    ``memories[i]`` maps each policy to layer i's activation bytes. Exact for identical layers
    (the usual case); for differing layers the choice of *which* layers is greedy by saving.
    """
    n = len(memories)
    full_order = _by_saving(memories, list(range(n)), "full")
    best: tuple | None = None
    for n_full in range(n + 1):
        full = set(full_order[:n_full])
        rest = [i for i in range(n) if i not in full]
        base = sum(memories[i]["full"] for i in full) + sum(memories[i]["none"] for i in rest)
        n_sel = _fewest_selective(memories, rest, base, budget_bytes)
        if n_sel is None:
            continue
        key = (n_full * costs["full"] + n_sel * costs["selective"], n_full + n_sel, n_full)
        if best is None or key < best[0]:
            best = (key, full, _by_saving(memories, rest, "selective")[:n_sel])
    if best is None:
        _raise_no_fit(memories, budget_bytes)
    _, full, selective = best
    return ["full" if i in full else "selective" if i in selective else "none" for i in range(n)]


def _raise_no_fit(memories: list[dict[str, int]], budget_bytes: int) -> None:
    need = sum(m["full"] for m in memories)
    raise ConfigError(
        f"strategy.recompute_budget_mb={budget_bytes / 2**20:.3f}: even full recomputation of all "
        f"{len(memories)} layers keeps {need / 2**20:.3f} MB of activations per micro-batch; raise "
        f"the budget, lower strategy.micro_batch_size, or shard activations (tp with megatron_sp, "
        f"sp, pp)")
