"""Pipeline schedules as per-rank action lists.

A schedule is ``list[list[Action]]``: for every pipeline rank, the order in which it runs
forward (``F``), backward (``B``) and -- for zero-bubble schedules -- deferred weight-gradient
(``W``) passes of ``(micro-batch, local chunk)`` units. Sends and receives are implied: ``F`` of
global chunk ``c`` needs chunk ``c-1``'s output, ``B`` needs chunk ``c+1``'s input gradient.
Rank ``r`` holds the global chunks ``r, r+p, r+2p, ...`` (round-robin, as in Megatron's
interleaved schedule), so global chunk ``c`` is local chunk ``c // p`` of rank ``c % p``.

Keeping schedules as plain data lets one executor run all of them, lets the simulator in
``simulate.py`` check them for deadlocks and bubbles without processes, and keeps each
schedule a few lines that can be read next to its paper. ZB-V places its chunks in a V
instead (``placement``; its list comes from ``vshape``).
"""

from __future__ import annotations

from tetrad.parallel.pipeline.actions import Action, Placement, Schedule
from tetrad.parallel.pipeline.simulate import list_schedule
from tetrad.parallel.pipeline.vshape import v_placement, zero_bubble_v


SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero_bubble", "zero_bubble_v", "breadth_first")
LOOPED = ("interleaved", "breadth_first")  # v chunks per rank, round-robin


def chunks_per_rank(name: str, v: int) -> int:
    """Chunks a rank holds under schedule ``name`` with ``virtual_stages=v``."""
    return 2 if name == "zero_bubble_v" else v


def placement(name: str, p: int, v: int = 1) -> Placement:
    """Which rank holds which chunk under schedule ``name``."""
    return v_placement(p) if name == "zero_bubble_v" else Placement(p, v)


def check_micro_batches(name: str, p: int, m: int, v: int = 1) -> None:
    """Reject micro-batch counts a schedule cannot run, naming the keys to change."""
    if name not in SCHEDULES:
        raise ValueError(f"strategy.pipeline_schedule={name!r} is not valid; use one of {SCHEDULES}")
    if m < 1:
        raise ValueError(f"a pipeline step needs at least one micro-batch (got {m})")
    if name == "interleaved" and m % p:
        raise ValueError(
            f"the interleaved schedule needs the number of micro-batches per step ({m}) to be a "
            f"multiple of strategy.pp={p} (Megatron's round-robin order); change "
            f"run.global_batch_size or strategy.micro_batch_size so that "
            f"global_batch_size / (dp * micro_batch_size) is a multiple of {p}")
    if name not in LOOPED and v != 1:
        raise ValueError(f"strategy.virtual_stages={v} needs pipeline_schedule 'interleaved' or "
                         f"'breadth_first' (got {name!r})")


def gpipe(p: int, m: int) -> Schedule:
    """All forwards, then all backwards (Huang et al.): m micro-batches of activations live."""
    return [[Action("F", j, 0) for j in range(m)] + [Action("B", j, 0) for j in range(m)]
            for _ in range(p)]


def one_f_one_b(p: int, m: int) -> Schedule:
    """PipeDream-flush / Megatron 1F1B: rank r warms up with p-r-1 forwards, then alternates
    one forward and one backward, so at most p-r micro-batches are in flight on rank r."""
    out = []
    for r in range(p):
        warm = min(p - r - 1, m)
        acts = [Action("F", j, 0) for j in range(warm)]
        for j in range(m - warm):
            acts += [Action("F", warm + j, 0), Action("B", j, 0)]
        acts += [Action("B", j, 0) for j in range(m - warm, m)]
        out.append(acts)
    return out


def _interleaved_unit(k: int, p: int, v: int, forward: bool) -> tuple[int, int]:
    """(micro-batch, local chunk) of a rank's k-th forward or backward unit (Megatron's order:
    groups of p micro-batches sweep the chunks; backward sweeps them in reverse)."""
    group = k // p
    chunk = group % v
    mb = (k // (p * v)) * p + k % p
    return mb, chunk if forward else v - 1 - chunk


def interleaved(p: int, m: int, v: int) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021): v chunks per rank cut the bubble by v."""
    check_micro_batches("interleaved", p, m, v)
    total = m * v
    out = []
    for r in range(p):
        warm = total if m == p else min((p - r - 1) * 2 + (v - 1) * p, total)
        fwd = [Action("F", *_interleaved_unit(k, p, v, True)) for k in range(total)]
        bwd = [Action("B", *_interleaved_unit(k, p, v, False)) for k in range(total)]
        acts = fwd[:warm]
        for k in range(total - warm):
            acts += [fwd[warm + k], bwd[k]]
        acts += bwd[total - warm:]
        out.append(acts)
    return out


def zero_bubble_h1(p: int, m: int, costs: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Schedule:
    """ZB-H1 (Qi et al. 2024): 1F1B's order of F and B, with each weight-gradient pass W
    placed by list scheduling on a cost model: a rank runs its next F/B as soon as its input
    has arrived (and, for F, while fewer than p-r micro-batches hold activations -- 1F1B's
    memory), and fills the time it would otherwise wait with pending W passes. Input-gradient
    chains no longer wait for weight gradients, which removes about (p-1)·T_W of bubble."""
    return list_schedule(one_f_one_b(p, m), p, costs)


def breadth_first(p: int, m: int, v: int) -> Schedule:
    """Looped breadth-first (Lamy-Poirier 2022): the looping placement of interleaved 1F1B, but
    every micro-batch runs through one chunk before the next chunk starts, forward and then
    (in reverse) backward -- GPipe's order on v chunks per rank. A chunk's parameters are
    needed in one unbroken run of m passes each way, which is what lets ZeRO-3 gather them
    and reduce-scatter their gradients once per run instead of once per micro-batch; its
    bubble is interleaved's, (p-1)/(vm + p-1), at GPipe's activation memory (m v chunks)."""
    fwd = [Action("F", j, c) for c in range(v) for j in range(m)]
    bwd = [Action("B", j, c) for c in reversed(range(v)) for j in range(m)]
    return [fwd + bwd for _ in range(p)]


def build_schedule(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """The action lists of every rank for schedule ``name`` (see ``SCHEDULES``); rank r holds
    the chunks ``placement(name, p, v)`` gives it."""
    check_micro_batches(name, p, m, v)
    if name == "gpipe":
        return gpipe(p, m)
    if name == "1f1b":
        return one_f_one_b(p, m)
    if name == "interleaved":
        return interleaved(p, m, v)
    if name == "zero_bubble":
        return zero_bubble_h1(p, m)
    if name == "zero_bubble_v":
        return zero_bubble_v(p, m)
    if name == "breadth_first":
        return breadth_first(p, m, v)
    raise ValueError(f"strategy.pipeline_schedule={name!r} is not valid; use one of {SCHEDULES}")
