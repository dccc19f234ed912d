"""Pipeline schedules as per-rank action lists.

A schedule is ``list[list[Action]]``: for every pipeline rank, the order in which it runs
forward (``F``), backward (``B``) and -- for zero-bubble schedules -- deferred weight-gradient
(``W``) passes of ``(micro-batch, local chunk)`` units. Sends and receives are implied: ``F`` of
global chunk ``c`` needs chunk ``c-1``'s output, ``B`` needs chunk ``c+1``'s input gradient.
Rank ``r`` holds the global chunks ``r, r+p, r+2p, ...`` (round-robin, as in Megatron's
interleaved schedule), so global chunk ``c`` is local chunk ``c // p`` of rank ``c % p``.

Keeping schedules as plain data lets one executor run all of them, lets the simulator in
``simulate.py`` check them for deadlocks and bubbles without processes, and keeps each
schedule a few lines that can be read next to its paper.
"""

from __future__ import annotations

from tetrad.parallel.pipeline.actions import Action, Schedule
from tetrad.parallel.pipeline.simulate import list_schedule


SCHEDULES = ("gpipe", "1f1b", "interleaved", "zero_bubble")


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
    if name != "interleaved" and v != 1:
        raise ValueError(f"strategy.virtual_stages={v} needs pipeline_schedule 'interleaved' (got {name!r})")


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


def build_schedule(name: str, p: int, m: int, v: int = 1) -> Schedule:
    """The action lists of every rank for schedule ``name`` (see ``SCHEDULES``)."""
    check_micro_batches(name, p, m, v)
    if name == "gpipe":
        return gpipe(p, m)
    if name == "1f1b":
        return one_f_one_b(p, m)
    if name == "interleaved":
        return interleaved(p, m, v)
    if name == "zero_bubble":
        return zero_bubble_h1(p, m)
    raise ValueError(f"strategy.pipeline_schedule={name!r} is not valid; use one of {SCHEDULES}")
