"""Placement by a host budget (``strategy.offload.host_memory_gb``): which offloaded state rests
in host memory, and which in ``nvme_dir`` files.

Every byte kept in host memory is disk traffic saved each step, and the kinds of state differ
in how much (ZeRO-3 with nvme tiers, per step):

* compute parameters in their own files (``params: nvme`` below fp32): read before forward,
  again before backward, written after the step: 3 accesses per byte;
* fp32 masters: read and written by the optimizer: 2, and in fp32 training, where they *are*
  the compute parameters (no parameter files), read twice more: 4;
* Adam moments: read and written: 2;
* reduced gradients: written during backward, read by the step: 2 (``step: sync``); under
  ``step: delayed`` two names alternate, each written and read every other step: 1.

So the budget is filled greedily, most traffic per byte first, ties in the order parameters,
masters, moments, gradients; an entry that does not fit is skipped and smaller ones may still
fit after it. Entries are the tiers' own units: a piece of a group's shard per state key
(``tetrad.offload.tier.PIECE`` elements), a whole group's shard for parameter files. The choice
never changes numerics: the same kernel steps the same values wherever they rest.

N is in GiB (2^30 bytes), as hardware specs count host memory. ``auto``: the memory available when the run starts (``MemAvailable``), less a safety margin
for everything that is not placed state (the process, the tiers' streaming buffers, gathered
units and activations; ``margin_bytes``), shared evenly by the ranks of this node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

GIB = 2**30
TIE_ORDER = ("param", "master", "exp_avg", "exp_avg_sq", "grad", "grad1")
OVERLAP_AHEAD = 8  # pieces read ahead by the overlapped step's stream (8 x 3 x 16 MiB)


@dataclass(frozen=True)
class Entry:
    key: str      # "param", "master", an optimizer state key or a gradient key
    index: int    # the group (param) or the piece (state) it belongs to
    nbytes: int
    traffic: float  # disk accesses per byte per step if it were in a file


def traffic(key: str, *, shared: bool, step: str) -> float:
    """Disk accesses per byte per step of one kind of state (see the module doc)."""
    if key == "param":
        return 3.0
    if key == "master":
        return 4.0 if shared else 2.0
    if key.startswith("grad"):
        return 1.0 if step == "delayed" else 2.0
    return 2.0


def choose(entries: list[Entry], budget: int) -> set[tuple[str, int]]:
    """The (key, index) entries kept in host memory within ``budget`` bytes."""
    def rank(e: Entry):
        tie = TIE_ORDER.index(e.key) if e.key in TIE_ORDER else len(TIE_ORDER)
        return (-e.traffic, tie, e.index)

    kept, used = set(), 0
    for e in sorted(entries, key=rank):
        if used + e.nbytes <= budget:
            kept.add((e.key, e.index))
            used += e.nbytes
    return kept


def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def margin_bytes(total: int, working: int) -> int:
    """What ``auto`` leaves free: 2 GiB or a tenth of the machine's memory, whichever is more,
    plus the run's working set outside placed state (``working``: streaming buffers, gathered
    units, activations, as the tier estimates them)."""
    return max(2 * GIB, total // 10) + working


def working_bytes(step: str, keys: int, piece: int, largest: int, common: int, elem: int) -> int:
    """The run's working set outside placed state, which ``auto`` leaves free besides the fixed
    margin: the state stream's buffers ((read-ahead + 2) per state key, ``piece`` fp32 elements
    each) and the gradient pool (4 pieces); stage 3's largest unit in flight: gathered, its
    gradient from autograd, the flat buffer it is reduced in and a read buffer (4 x
    ``largest`` elements); and the blocks around it (5 x the commonest unit, ``common``: the
    neighbour in backward with the same four buffers, and the one prefetched), at ``elem``
    bytes. Measured (docs/benchmarks.md, the #17 targets): peak RSS less the process at start
    was 2.88 GB against 2.92 estimated for vocab 128256 x d 1024, 12.97 against 13.0 for d
    4096; 3 blocks, the earlier count, fell 1.6 GB short at d 4096 and took the 8B shape to
    within 0.1 GiB of a 23 GiB machine's memory. One home for the tier (``OffloadPlacement``)
    and the cost model (``tetrad.strategy.offload_cost``), so a plan's ``auto`` places what
    the run will."""
    ahead = OVERLAP_AHEAD if step == "overlap" else 1
    return (ahead + 2) * keys * piece * 4 + 4 * piece * 4 + (4 * largest + 5 * common) * elem


def resolve(host_memory_gb, working: int, local_ranks: int | None = None) -> tuple[int, dict]:
    """(budget in bytes for this rank, how it was found) for ``host_memory_gb`` N or ``auto``."""
    if host_memory_gb != "auto":
        return int(float(host_memory_gb) * GIB), {"host_memory_gb": float(host_memory_gb)}
    info = _meminfo()
    avail = info.get("MemAvailable", 0)
    total = info.get("MemTotal", avail)
    ranks = local_ranks or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    margin = margin_bytes(total, working * ranks)
    budget = max(0, (avail - margin) // max(ranks, 1))
    return budget, {"host_memory_gb": "auto", "available_bytes": avail, "margin_bytes": margin,
                    "ranks_on_node": ranks}
