"""Cost inputs for this machine, read from a profile (tetrad.profiler).

Assumptions:

* Layer and head times are linear in the micro-batch size (a fixed launch/Python overhead plus
  work per sample): fitted per (tp, sp, policy) over the measured sizes, so sizes in between
  and beyond are inter/extrapolated.
* Activation bytes are proportional to the micro-batch size (every term of Korthikanti et al.'s
  formula is); the smallest measured size sets the slope.
* Megatron-SP's activations are the measured tp bytes scaled by Korthikanti et al.'s ratio of
  the formulas with and without it (Megatron-SP divides the replicated norm/dropout part by t).
* A collective on a group size that was not measured uses the nearest measured size's fit,
  rescaled by the ring formula's (g-1)/g volume factor.
* On a machine without an accelerator, device memory and host memory are one pool, split
  evenly over the ranks of the node; 90% of what is available is usable.
* Ranks sharing cores: the layer, head and optimizer times were measured with every rank of
  the node computing at once (tetrad.profiler.layers.time_fwd_bwd), which is what a step
  does when every rank computes. When only some ranks compute (pipeline fill and drain),
  they share the cores with fewer peers: with k of n ranks busy a rank runs
  max(1, k / c) times slower than alone, c = n / slowdown the ranks the node runs at full
  speed, slowdown the profile's measured t(all ranks) / t(one rank) (``contention``);
  ``busy_factor`` is that time relative to the all-busy time the profile holds.
"""

from __future__ import annotations

from tetrad.models.args import ModelArgs
from tetrad.profiler.collectives import fit

USABLE_FRACTION = 0.9


def _lstsq(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Unclamped least-squares (intercept, slope); a single point is all intercept."""
    if len(points) == 1:
        return points[0][1], 0.0
    xs, ys = [float(x) for x, _ in points], [float(y) for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - slope * mx, slope


def _linear(points: list[tuple[int, float]]) -> tuple[float, float]:
    if len(points) == 1:
        return 0.0, points[0][1] / points[0][0]
    return fit(points)


class MeasuredCosts:
    """The cost model's inputs from a profile measured on this machine and world."""

    same_pool = True

    def __init__(self, profile: dict, args: ModelArgs, precision: str):
        self.profile, self.args, self.precision = profile, args, precision
        self.name = "this machine"
        self.elem = 4 if precision == "fp32" else 2
        self._layer = self._fits(profile["layers"], ("tp", "sp", "policy"))
        self._head = self._fits(profile["head"], ("tp", "sp"))
        self._acts = {}
        for row in sorted(profile["activations"], key=lambda r: -r["mbs"]):  # smallest b wins
            for policy, n in row["bytes"].items():
                self._acts[(row["tp"], row["sp"], policy)] = n / row["mbs"]
        mem = profile["memory"]
        local = profile["key"]["hardware"]["local_world"]
        self.device_budget = USABLE_FRACTION * mem["device_free_bytes"] / (local if mem["device"] == "cpu" else 1)
        self.same_pool = mem["device"] == "cpu"
        host = mem["host"]["available_bytes"] or mem["device_free_bytes"]
        self.host_budget = USABLE_FRACTION * host / local
        hd = profile.get("host_device") or {}
        self.host_device_Bps = hd.get("h2d_Bps")  # None on a CPU-only machine: nothing to move
        self.disk_read_Bps = profile["disk"]["read_Bps"]
        self.disk_write_Bps = profile["disk"]["write_Bps"]
        self.overlap = profile.get("overlap", 1.0)
        self.peak_flops = None
        contention = profile.get("contention") or {}
        self.slowdown = float(contention.get("slowdown", 1.0))
        self.node_ranks = int(contention.get("ranks", local))
        self._over = self._overhead_fits(profile.get("micro_batch") or [], args.n_layers)

    def _overhead_fits(self, rows: list[dict], n_layers: int):
        """(fwd, bwd) least-squares lines in b of the whole micro-batch minus its parts:
        measured whole-model seconds - n_layers x layer(tp1, sp1, none) - head(tp1, sp1).
        Not clamped: the difference may be negative (see ``micro_batch_overhead``)."""
        if not rows or (1, 1, "none") not in self._layer or (1, 1) not in self._head:
            return None
        f, b = [], []
        for r in rows:
            lf, lb = self.layer(1, 1, r["mbs"], "none")
            hf, hb = self.head(1, 1, r["mbs"])
            f.append((r["mbs"], r["fwd_s"] - n_layers * lf - hf))
            b.append((r["mbs"], r["bwd_s"] - n_layers * lb - hb))
        return _lstsq(f), _lstsq(b)

    def micro_batch_overhead(self, tp: int, sp: int, b: int, stage_share: float) -> tuple[float, float]:
        """(fwd, bwd) seconds a micro-batch through the engine costs beyond the sum of its
        separately timed layers and head.

        Measured at tp1/sp1 on the whole model (tetrad.profiler.layers.measure_micro_batch),
        fitted as a + c*b. The difference has two signs of cause: what lies between the layers
        (module and autograd-graph Python overhead, gradient accumulation and hooks, the loss
        glue) adds time; what a layer timed alone pays per call and a layer inside the model
        does not (the autograd engine's start and finish of a backward call, a fresh input's
        first touch) is counted once per layer in the sum, and the difference takes it back
        out. Assumptions: the fixed part a does not depend on the shard shape; the per-sample
        part c*b is work on activations and gradients, of which a tp x sp rank does 1/(tp*sp);
        both are spread over the model's layers, so a pipeline stage holding ``stage_share`` of
        them pays that share. The caller keeps the micro-batch's total non-negative.
        """
        if self._over is None:
            return 0.0, 0.0
        (af, cf), (ab, cb) = self._over
        k = b / (tp * sp)
        return stage_share * (af + cf * k), stage_share * (ab + cb * k)

    def busy_factor(self, fraction: float) -> float:
        """Compute time with ``fraction`` of the node's ranks busy over the all-busy time (<= 1)."""
        if self.slowdown <= 1.0:
            return 1.0
        full_speed = self.node_ranks / self.slowdown
        busy = max(1.0, fraction * self.node_ranks)
        return max(1.0, busy / full_speed) / self.slowdown

    @staticmethod
    def _fits(rows: list[dict], keys: tuple[str, ...]) -> dict:
        groups: dict[tuple, dict[str, list]] = {}
        for r in rows:
            g = groups.setdefault(tuple(r[k] for k in keys), {"fwd": [], "bwd": []})
            g["fwd"].append((r["mbs"], r["fwd_s"]))
            g["bwd"].append((r["mbs"], r["bwd_s"]))
        return {k: (_linear(v["fwd"]), _linear(v["bwd"])) for k, v in groups.items()}

    def has_shape(self, tp: int, sp: int) -> bool:
        return (tp, sp, "none") in self._layer

    def layer(self, tp: int, sp: int, b: int, policy: str, msp: bool = False) -> tuple[float, float]:
        """Measured without Megatron-SP (``msp`` is accepted and not priced: its norm-region
        saving is a few percent of a layer, inside this machine's noise)."""
        (fa, fb), (ba, bb) = self._layer[(tp, sp, policy)]
        return fa + fb * b, ba + bb * b

    def head(self, tp: int, sp: int, b: int) -> tuple[float, float]:
        (fa, fb), (ba, bb) = self._head[(tp, sp)]
        return fa + fb * b, ba + bb * b

    def act_bytes(self, tp: int, sp: int, b: int, policy: str) -> float:
        per = self._acts.get((tp, sp, policy))
        if per is None:
            raise KeyError(f"the profile holds no activation bytes for tp={tp}, sp={sp}, recompute "
                           f"{policy!r}; re-profile with --force")
        return per * b

    def coll(self, kind: str, g: int, stride: int, nbytes: float) -> float:
        if g <= 1:
            return 0.0
        table = self.profile["collectives"].get(kind, {})
        sizes = sorted({int(k.split("/")[0]) for k in table})
        if not sizes:
            raise KeyError(f"profile has no {kind} measurement; re-profile on the target world")
        near = min(sizes, key=lambda x: abs(x - g))
        placement = "inter" if f"{near}/inter" in table and stride > 1 else "intra"
        entry = table.get(f"{near}/{placement}") or table[f"{near}/intra"]
        scale = ((g - 1) / g) / ((near - 1) / near)
        return entry["alpha_s"] + entry["beta_s_per_byte"] * nbytes * scale

    def adam(self, params: float) -> float:
        return params * self.profile["adam_s_per_param"]

    def host_adam(self, params: float) -> float:
        return self.adam(params)
