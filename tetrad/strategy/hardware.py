"""Cluster specs for planning machines we do not have (``--hardware HW.yaml`` or a shipped name).

A spec states the accelerator as installed, not only the vendor's best figures: its dense peak
per dtype, HBM size and bandwidth, links, and where a site runs it below its rated power
(``power_limit_w`` with the chip's ``power_curve``, e.g. an H100 at 500 W), the peak it sustains
there. Achieved rates come from ``efficiency`` curves (``tetrad.strategy.efficiency``): the
accelerator family's calibrated ones (``hardware/calibration.yaml``, fitted by
``tetrad.strategy.calibrate`` to published runs) under the spec's own ``efficiency:`` keys.

Memory: ``memory_gb`` is the vendor's HBM size, which vendors count in GiB (an "80 GB" A100
reports 80 GiB); ``context_gb`` of it is taken by the CUDA context outside any allocator.
Placement follows the mesh order (pp, dp, sp, tp), tp innermost: see ``members_per_node``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from tetrad.strategy.efficiency import Efficiency, EfficiencyError

SHIPPED = ("a100_40gb", "a100_80gb", "h100_sxm", "h100_pcie", "h100_nvl", "h200", "h100_96gb_500w",
           "a100_80gb_opa", "v100_dgx2_100g")
ALIASES = {"a100_80gb_cluster": "a100_80gb", "h100_80gb_cluster": "h100_sxm"}
GIB = 2 ** 30


class HardwareError(ValueError):
    """A malformed spec: the message names the file and the key."""


@dataclass
class Link:
    bandwidth_GBps: float
    efficiency: float = 0.8            # the largest messages' share of bandwidth (bus efficiency)
    latency_us: float = 10.0
    nics_per_node: int | None = None

    @property
    def Bps(self) -> float:
        return self.bandwidth_GBps * 1e9 * self.efficiency


@dataclass
class HardwareSpec:
    name: str
    nodes: int
    accelerators_per_node: int
    peak_tflops: dict
    memory_gb: float
    intra_node: Link
    inter_node: Link
    accelerator: str = ""
    family: str = ""                   # calibration family: ampere | hopper
    tdp_w: float | None = None
    power_limit_w: float | None = None
    power_curve: dict = field(default_factory=dict)   # watts -> share of peak sustained
    context_gb: float = 0.5
    usable_memory_fraction: float = 1.0
    memory_bandwidth_GBps: float = 2000.0
    nccl_mb_per_group: float = 128.0
    host_device_GBps: float = 24.0
    host_memory_gb: float = 1024.0
    cpu_adam_s_per_param: float = 2e-9
    disk_read_GBps: float = 3.0
    disk_write_GBps: float = 1.5
    disk_gb: float | None = None       # free space under the nvme tier's directory, per node; None: unbounded
    efficiency: Efficiency = field(default_factory=Efficiency)
    extra: dict = field(default_factory=dict)

    @property
    def world(self) -> int:
        return self.nodes * self.accelerators_per_node

    def power_share(self) -> float:
        """Share of the listed peak sustained at ``power_limit_w``: the power curve linearly
        interpolated (clamped to its end points); 1 without a limit."""
        if self.power_limit_w is None or not self.power_curve:
            return 1.0
        points = sorted((float(w), float(s)) for w, s in self.power_curve.items())
        w = self.power_limit_w
        if w <= points[0][0]:
            return points[0][1]
        for (w0, s0), (w1, s1) in zip(points, points[1:]):
            if w <= w1:
                return s0 + (s1 - s0) * (w - w0) / (w1 - w0)
        return points[-1][1]

    def peak_flops(self, precision: str) -> float:
        if precision not in self.peak_tflops:
            raise HardwareError(f"spec {self.name!r} states no peak for precision {precision!r}; "
                                f"peak_tflops has {sorted(self.peak_tflops)}")
        return self.peak_tflops[precision] * 1e12 * self.power_share()

    def device_bytes(self) -> float:
        """Bytes the framework's allocator and NCCL may use: HBM less the CUDA context."""
        return (self.memory_gb - self.context_gb) * GIB * self.usable_memory_fraction


def _read(path_or_name: str) -> tuple[str, str]:
    name = ALIASES.get(path_or_name, path_or_name)
    path = Path(path_or_name)
    if not path.exists() and name in SHIPPED:
        res = resources.files("tetrad.strategy").joinpath(f"hardware/{name}.yaml")
        return f"tetrad/strategy/hardware/{name}.yaml", res.read_text()
    if not path.exists():
        raise HardwareError(f"--hardware {path_or_name!r}: no such file and not a shipped spec; "
                            f"shipped: {', '.join(SHIPPED)}")
    return str(path), path.read_text()


def calibration() -> dict:
    """The fitted curves per accelerator family and the allocator share (calibration.yaml)."""
    text = resources.files("tetrad.strategy").joinpath("hardware/calibration.yaml").read_text()
    return yaml.safe_load(text) or {}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _number(raw: dict, key: str, where: str, positive: bool = True):
    value = raw[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HardwareError(f"{where}: {key}={value!r} must be a number")
    if positive and value <= 0:
        raise HardwareError(f"{where}: {key}={value} must be > 0")
    return value


def spec_from_dict(raw: dict, where: str = "spec", calib: dict | None = None) -> HardwareSpec:
    """A HardwareSpec from a parsed YAML mapping; ``where`` prefixes every error."""
    if not isinstance(raw, dict):
        raise HardwareError(f"{where}: must be a mapping of spec keys")
    raw = dict(raw)
    known = {f.name for f in dataclasses.fields(HardwareSpec)} - {"extra"}
    for key in ("name", "nodes", "accelerators_per_node", "peak_tflops", "memory_gb", "intra_node",
                "inter_node"):
        if key not in raw:
            raise HardwareError(f"{where}: missing key {key!r}")
    for key in ("nodes", "accelerators_per_node", "memory_gb", "memory_bandwidth_GBps"):
        if key in raw:
            _number(raw, key, where)
    if not isinstance(raw["peak_tflops"], dict) or not raw["peak_tflops"]:
        raise HardwareError(f"{where}: peak_tflops must map a precision to TFLOP/s")
    for link in ("intra_node", "inter_node"):
        try:
            raw[link] = Link(**raw[link])
        except TypeError as err:
            raise HardwareError(f"{where}: {link}: {err}") from None
    calib = calibration() if calib is None else calib
    family = raw.get("family", "")
    fitted = (calib.get("families") or {}).get(family, {}) if family else {}
    own = dict(raw.get("efficiency") or {})
    if "matmul_efficiency" in raw:
        # A spec from before the curves: its one flat GEMM efficiency keeps its meaning.
        _number(raw, "matmul_efficiency", where)
        own.setdefault("gemm", {"top": raw.pop("matmul_efficiency"), "half_dim": 0})
    try:
        raw["efficiency"] = Efficiency.from_dict(_merge(fitted, own), f"{where}: efficiency")
    except EfficiencyError as err:
        raise HardwareError(str(err)) from None
    extra = {k: raw.pop(k) for k in list(raw) if k not in known}
    return HardwareSpec(**raw, extra=extra)


def load_hardware(path_or_name: str, calib: dict | None = None) -> HardwareSpec:
    """A spec from a YAML path, or a shipped one by name ("h100_sxm"; old names still work)."""
    where, text = _read(path_or_name)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise HardwareError(f"{where}: not valid YAML: {err}") from None
    return spec_from_dict(raw, where, calib)


def members_per_node(g: int, stride: int, per_node: int) -> int:
    """How many of a group's g members (ranks ``stride`` apart, aligned blocks) share a node."""
    if g * stride <= per_node:
        return g
    return max(1, min(g, per_node // stride))


def ring_time(kind: str, g: int, nbytes: float, bw: float, alpha: float) -> float:
    """Seconds of one collective on g ranks; nbytes is the full buffer (see profiler.collectives).

    Rings are bandwidth-optimal (all-reduce moves 2(g-1)/g of the buffer per rank, all-gather /
    reduce-scatter / all-to-all (g-1)/g); all-reduce latency is 2 log2(g) steps (NCCL's trees),
    the others g - 1."""
    if g <= 1:
        return 0.0
    if kind == "all_reduce":
        return 2 * (g - 1) / g * nbytes / bw + 2 * math.ceil(math.log2(g)) * alpha
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):
        return (g - 1) / g * nbytes / bw + (g - 1) * alpha
    return alpha + nbytes / bw  # send_recv

