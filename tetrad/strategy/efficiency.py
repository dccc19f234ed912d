"""Achieved rates as functions of the operation and its size, for pricing a cluster from its spec.

One flat "matmul efficiency" cannot price a 125M model and a 1T model, an A100 of 2021 and an
H100 of 2024 alike: small GEMMs, long-sequence attention, memory-bound element-wise work and
small collectives all run far below the vendor's peak, each by its own law. Each curve here is
a few parameters a cluster spec carries (``efficiency:`` in ``hardware/*.yaml``), that
``tetrad.profiler`` measures on a machine at hand (``tetrad.profiler.kernels``) and that
``tetrad.strategy.calibrate`` fits to published runs:

* ``Saturating(top, half)``: ``rate(x) = top * x / (x + half)``, the fraction of a peak a
  transfer of size x reaches when every transfer pays a fixed start-up cost (latency,
  launch, a partial wave): time = (x + half) / (top * peak), i.e. the alpha-beta line. It
  prices host<->device copies and disk I/O by transfer size, and collectives by message size
  (their bus efficiency: the link's top, halved at ``intra_half_bytes`` / ``inter_half_bytes``).
* ``GemmCurve``: a (m, n, k) GEMM reaches ``top * prod(d / (d + half_dim))`` of the dtype's
  peak (each dimension shorter than the tile size wastes a share of the tiles), and never
  beats the memory roofline (reading both operands and writing the result at HBM speed).
* ``AttentionCurve``: fused (flash / SDPA) attention reaches ``top * s / (s + half_seq)`` of
  the peak on its 4 b s^2 h FLOPs, skipping the masked half when causal; its backward costs
  ``backward_ratio`` forwards (it recomputes the scores: 5 matmuls for the forward's 2). The
  math kernel materialises the s x s scores: two batched GEMMs (k = head_dim) plus
  memory-bound softmax passes over b * heads * s^2 elements.
* Element-wise and norm work is priced by the bytes it reads and writes at
  ``memory_top`` of the HBM bandwidth.

Each curve is deterministic and has no state; ``Efficiency.from_dict`` validates a spec's
section and names the key that is wrong.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


class EfficiencyError(ValueError):
    """A malformed ``efficiency`` section: the message names the key and what is valid."""


@dataclass(frozen=True)
class Saturating:
    """rate(x) = top * x / (x + half); half = 0 is a flat ``top``."""

    top: float
    half: float = 0.0

    def __call__(self, x: float) -> float:
        if x <= 0:
            return self.top
        return self.top * x / (x + self.half)

    def seconds(self, nbytes: float, peak_Bps: float) -> float:
        """Time to move ``nbytes`` at ``peak_Bps``: (nbytes + half) / (top * peak)."""
        if nbytes <= 0:
            return 0.0
        return nbytes / (peak_Bps * self(nbytes))


@dataclass(frozen=True)
class GemmCurve:
    """Fraction of peak of an (m, n, k) GEMM: top * prod over dims of d / (d + half_dim)."""

    top: float = 0.8
    half_dim: float = 64.0
    dtype_top: dict = field(default_factory=dict)   # e.g. {"fp32": 0.7}: TF32 reaches less

    def efficiency(self, m: float, n: float, k: float, dtype: str = "bf16") -> float:
        top = self.dtype_top.get(dtype, self.top)
        out = top
        for d in (m, n, k):
            out *= d / (d + self.half_dim)
        return out

    def seconds(self, m: float, n: float, k: float, peak_flops: float, mem_Bps: float,
                elem: int, dtype: str = "bf16") -> float:
        """max(compute at the curve's rate, the operands and result at memory speed)."""
        if m <= 0 or n <= 0 or k <= 0:
            return 0.0
        compute = 2.0 * m * n * k / (peak_flops * self.efficiency(m, n, k, dtype))
        memory = elem * (m * k + k * n + m * n) / mem_Bps
        return max(compute, memory)


@dataclass(frozen=True)
class AttentionCurve:
    """Fused attention's rate by sequence length; see the module docstring."""

    top: float = 0.6
    half_seq: float = 512.0
    backward_ratio: float = 2.5
    causal_skip: bool = True          # causal kernels skip the masked half of the blocks

    def efficiency(self, seq: float) -> float:
        return self.top * seq / (seq + self.half_seq)

    def forward_seconds(self, flops: float, seq: float, peak_flops: float, causal: bool) -> float:
        """``flops`` is the unmasked 4 b s^2 (heads * head_dim) of QK^T and PV."""
        work = flops * (0.5 if causal and self.causal_skip else 1.0)
        return work / (peak_flops * self.efficiency(seq))


@dataclass(frozen=True)
class Efficiency:
    """Every curve of one accelerator (and its links), as a spec carries them."""

    gemm: GemmCurve = field(default_factory=GemmCurve)
    attention: AttentionCurve = field(default_factory=AttentionCurve)
    memory_top: float = 0.8                      # element-wise / norm share of HBM bandwidth
    # Collectives: a message of this many bytes reaches half the link's bus efficiency (the
    # spec's ``intra_node.efficiency`` / ``inter_node.efficiency``, its largest messages').
    intra_half_bytes: float = 4.0 * 2 ** 20
    inter_half_bytes: float = 8.0 * 2 ** 20
    # Copies and file I/O: share of the spec's (effective) host_device / disk rate by size.
    host_device: Saturating = Saturating(1.0, 1 << 20)
    disk: Saturating = Saturating(1.0, 4 << 20)

    @classmethod
    def from_dict(cls, raw: dict | None, where: str = "efficiency") -> "Efficiency":
        """Build from a spec's ``efficiency:`` mapping; unknown keys and bad values fail."""
        raw = dict(raw or {})
        out = cls()
        kwargs = {}
        for name, value in raw.items():
            if name not in _FIELDS:
                raise EfficiencyError(f"{where}.{name}: unknown key; valid: {sorted(_FIELDS)}")
            kwargs[name] = _build(name, value, getattr(out, name), f"{where}.{name}")
        return dataclasses.replace(out, **kwargs)

    def to_dict(self) -> dict:
        return {name: _plain(getattr(self, name)) for name in _FIELDS}


_FIELDS = ("gemm", "attention", "memory_top", "intra_half_bytes", "inter_half_bytes", "host_device", "disk")
_UNIT = {"top", "memory_top"}                   # fractions of a peak: (0, 1]


def _check(key: str, value, where: str):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise EfficiencyError(f"{where}={value!r}: must be a number")
    if key in _UNIT and not 0 < value <= 1:
        raise EfficiencyError(f"{where}={value}: a fraction of the peak, in (0, 1]")
    if key not in _UNIT and value < 0:
        raise EfficiencyError(f"{where}={value}: must be >= 0")
    return float(value)


def _build(name: str, value, default, where: str):
    if not dataclasses.is_dataclass(default):
        return _check(name, value, where)
    if not isinstance(value, dict):
        raise EfficiencyError(f"{where}={value!r}: must be a mapping of "
                              f"{[f.name for f in dataclasses.fields(default)]}")
    known = {f.name for f in dataclasses.fields(default)}
    kwargs = {}
    for key, v in value.items():
        if key not in known:
            raise EfficiencyError(f"{where}.{key}: unknown key; valid: {sorted(known)}")
        if key == "dtype_top":
            if not isinstance(v, dict):
                raise EfficiencyError(f"{where}.dtype_top={v!r}: must map a dtype to a fraction")
            kwargs[key] = {d: _check("top", t, f"{where}.dtype_top.{d}") for d, t in v.items()}
        elif key == "causal_skip":
            if not isinstance(v, bool):
                raise EfficiencyError(f"{where}.causal_skip={v!r}: must be true or false")
            kwargs[key] = v
        else:
            kwargs[key] = _check(key, v, f"{where}.{key}")
    return dataclasses.replace(default, **kwargs)


def _plain(value):
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


def fit_saturating(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(top * peak, half) of measured (size, seconds): the least-squares line t = (x + half) / R
    (t = a + b x with R = 1 / b and half = a / b), clamped to be non-negative.

    Why a line and not a curve fit: the saturating rate is exactly the alpha-beta model, whose
    least-squares fit is closed-form and deterministic."""
    if len(points) < 2:
        raise ValueError("fit_saturating needs at least two (size, seconds) points")
    xs = [float(x) for x, _ in points]
    ts = [float(t) for _, t in points]
    mx, mt = sum(xs) / len(xs), sum(ts) / len(ts)
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / var if var else 0.0
    if b <= 0:
        return max(xs) / max(min(ts), 1e-30), 0.0
    a = max(0.0, mt - b * mx)
    return 1.0 / b, a / b


def fit_gemm(points: list[tuple[int, int, int, float]], peak_flops: float | None,
             half_dims: tuple[float, ...] = (16, 32, 64, 96, 128, 192, 256)) -> GemmCurve:
    """The GemmCurve best matching measured (m, n, k, seconds) in mean |log| error: for each
    candidate half_dim the best top is closed-form (the geometric mean of the ratios).
    With ``peak_flops`` None the rates are absolute: ``top`` is the fitted asymptote in FLOP/s."""
    if not points:
        raise ValueError("fit_gemm needs measured (m, n, k, seconds) points")
    best = None
    for half in half_dims:
        shape = GemmCurve(1.0, half)
        logs = [math.log(2.0 * m * n * k / (t * (peak_flops or 1.0)) / shape.efficiency(m, n, k))
                for m, n, k, t in points]
        top = math.exp(sum(logs) / len(logs))
        err = sum(abs(v - math.log(top)) for v in logs) / len(logs)
        if best is None or err < best[0]:
            best = (err, top if peak_flops is None else min(top, 1.0), half)
    return GemmCurve(best[1], best[2])
