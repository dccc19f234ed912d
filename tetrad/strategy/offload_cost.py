"""The offload tiers in the cost model: what rests where, and what the disk moves per step.

Per rank (a shard of Ψ_r parameters under ZeRO), the state an nvme tier may hold
(``tetrad.offload.tier``; K: per-parameter bytes):

* fp32 masters, 4 B: read and written by the step; in fp32 training with ``params: nvme`` the
  compute parameters are read from the master files too (no parameter files: twice per
  micro-batch, forward and backward);
* Adam's moments, 8 B (``optimizer.state_dtype: fp32``) or 4 B (bf16): read and written;
* reduced gradients (ZeRO 2-3), 4 B: written during backward, read by the step (``step:
  sync``); two alternating names (8 B) each written and read every other step (``delayed``);
  none under ``overlap``, which steps each bucket as it arrives;
* compute parameters below fp32 (``params: nvme``), 2 B: read twice per micro-batch, written
  after the step.

``host_memory_gb`` keeps the state with the most disk traffic per byte in host memory first
(``tetrad.offload.budget``, the same order here, filled fractionally); ``auto`` is the spec's
host memory per rank less the runtime's margin (``tetrad.offload.budget.margin_bytes``), the
run's working set included (``budget.working_bytes`` of the model's units, as the tier counts it).

Time: the disk serves the parameter reads of forward and backward (prefetched: they overlap
compute), the state stream of the step and the gradient writes. ``sync`` runs the state
stream after backward (exposed); ``overlap`` streams it during backward and ``delayed``
during the next forward and backward, so those two only pay what the disk cannot fit beside
compute: a step is never shorter than its disk time.
"""

from __future__ import annotations

from dataclasses import dataclass

from tetrad.config.schema import StrategyConfig
from tetrad.offload.budget import GIB, TIE_ORDER, margin_bytes, working_bytes
from tetrad.strategy.shapes import param_counts, rank_params

PIECE_ELEMS = 4 * 2**20  # the tier's streamed piece (tetrad.offload.tier.PIECE)


@dataclass
class Kind:
    key: str
    nbytes: float        # per rank
    reads: float         # times the whole kind is read per step
    writes: float
    in_step: bool        # read/written by the optimizer step (else: by forward/backward)
    host: float = 0.0    # bytes of it kept in host memory

    @property
    def traffic(self) -> float:
        return self.reads + self.writes


def kinds(s: StrategyConfig, shard: float, precision: str, state_dtype: str, m: int) -> list[Kind]:
    """The state an nvme tier holds for a rank's shard of ``shard`` parameters."""
    o = s.offload
    fp32 = precision == "fp32"
    out: list[Kind] = []
    if o.optimizer == "nvme":
        shared = o.params == "nvme" and fp32
        out.append(Kind("master", 4 * shard, 1 + (2 * m if shared else 0), 1, True))
        out.append(Kind("exp_avg", (2 if state_dtype == "bf16" else 4) * shard, 1, 1, True))
        out.append(Kind("exp_avg_sq", (2 if state_dtype == "bf16" else 4) * shard, 1, 1, True))
        if s.zero >= 2 and o.step == "sync":
            out.append(Kind("grad", 4 * shard, 1, 1, True))
        elif s.zero >= 2 and o.step == "delayed":
            out.append(Kind("grad", 8 * shard, 0.5, 0.5, True))
    if o.params == "nvme" and not (fp32 and o.optimizer == "nvme"):
        out.append(Kind("param", (4 if fp32 else 2) * shard, 2 * m, 1, False))
    return out


def budget(s: StrategyConfig, costs, other_host: float = 0.0, working: float = 0.0) -> float:
    """Bytes of nvme-tier state a rank may keep in host memory (``host_memory_gb``)."""
    hm = s.offload.host_memory_gb
    if hm != "auto":
        return float(hm) * GIB
    total = getattr(costs, "host_budget", 0.0)
    return max(0.0, total - margin_bytes(int(total), int(working)) - other_host)


def tier_working(s: StrategyConfig, costs, ks: list[Kind], shard: float, precision: str) -> float:
    """The tier's working set (``budget.working_bytes``) for the model of ``costs.args``: its
    units are the embedding, each block and the head (a tp rank's slice), its state keys the
    kinds streamed by the step (two gradient names under ``delayed``); 0 without a model."""
    a = getattr(costs, "args", None)
    if a is None:
        return 0.0
    c = param_counts(a)
    keys = sum(2 if k.key == "grad" and s.offload.step == "delayed" else 1 for k in ks if k.key != "param")
    largest = max(c.embed, c.head, c.layer) / s.tp
    piece = min(PIECE_ELEMS, largest * shard / rank_params(a, s))  # the largest unit's shard
    return working_bytes(s.offload.step, keys, int(piece), int(largest), int(c.layer / s.tp),
                         4 if precision == "fp32" else 2)


def place(ks: list[Kind], room: float) -> list[Kind]:
    """Fill ``room`` bytes most traffic per byte first (ties in the runtime's order)."""
    def rank(k: Kind):
        return (-k.traffic, TIE_ORDER.index(k.key) if k.key in TIE_ORDER else len(TIE_ORDER))

    for k in sorted(ks, key=rank):
        k.host = min(k.nbytes, max(0.0, room))
        room -= k.host
    return ks


def disk_io(ks: list[Kind]) -> dict[str, float]:
    """Bytes read and written per step, split into what forward/backward and the step move."""
    out = {"read_fb": 0.0, "write_fb": 0.0, "read_step": 0.0, "write_step": 0.0}
    for k in ks:
        spill = k.nbytes - k.host
        if k.key == "master" and k.reads > 1:  # the parameter reads of forward/backward
            out["read_fb"] += spill * (k.reads - 1)
            out["read_step"] += spill
            out["write_step"] += spill * k.writes
        elif k.key == "grad":  # written as backward reduces it, read by the step
            out["write_fb"] += spill * k.writes
            out["read_step"] += spill * k.reads
        else:
            where = "step" if k.in_step else "fb"
            out[f"read_{where}"] += spill * k.reads
            out[f"write_{where}"] += spill * k.writes
    return out


def placement(s: StrategyConfig, costs, shard: float, precision: str, state_dtype: str, m: int,
              other_host: float = 0.0) -> dict:
    """{'host', 'disk': bytes per rank, 'kinds': [...], and disk_io's bytes per step}."""
    ks = kinds(s, shard, precision, state_dtype, m)
    ks = place(ks, budget(s, costs, other_host, tier_working(s, costs, ks, shard, precision)))
    host = sum(k.host for k in ks)
    return {"host": host, "disk": sum(k.nbytes for k in ks) - host, "kinds": ks, **disk_io(ks)}


def chosen_host_gb(s: StrategyConfig, costs, shard: float, precision: str, state_dtype: str, m: int,
                   other_host: float = 0.0) -> float:
    """The ``host_memory_gb`` a plan writes for ``auto``: what the spec's host memory holds of
    this rank's nvme-tier state, in GiB rounded down to 0.1."""
    p = placement(s, costs, shard, precision, state_dtype, m, other_host)
    return int(p["host"] / GIB * 10) / 10
