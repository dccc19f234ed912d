"""Cost inputs for a cluster we do not have, from its spec sheet (``--hardware HW.yaml``).

Assumptions (each also stated in the shipped YAML files):

* Compute: a layer's FLOPs (Narayanan et al.: 24bsh^2 + 4bs^2h forward for MHA with d_ff = 4h;
  counted from the real shapes) at ``peak x matmul_efficiency``, plus element-wise work priced
  as three passes over the layer's stored activations at HBM bandwidth. Backward = 2 forwards.
* Attention is FlashAttention-style (PyTorch SDPA on these GPUs): no s x s tensor is stored, so
  activations follow Korthikanti et al. without the 5as/h term.
* Placement follows the mesh order (pp, dp, sp, tp), tp innermost: a group of g ranks a stride
  apart has k = members per node; k = g runs over NVLink, otherwise the ring's inter-node hop
  is shared by the k members' NICs (one NIC per GPU, rail-optimised).
* Collectives are bandwidth-optimal rings (all-reduce moves 2(g-1)/g of the buffer per rank,
  all-gather / reduce-scatter / all-to-all (g-1)/g);
  link bandwidth x efficiency is what a collective achieves. All-reduce latency is
  2 log2(g) steps (NCCL's trees); all-gather, reduce-scatter and all-to-all are rings, g - 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from tetrad.models.args import ModelArgs

SHIPPED = ("a100_80gb_cluster", "h100_80gb_cluster")


@dataclass
class Link:
    bandwidth_GBps: float
    efficiency: float = 0.8
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
    matmul_efficiency: float = 0.75
    usable_memory_fraction: float = 0.9
    memory_bandwidth_GBps: float = 2000.0
    host_device_GBps: float = 24.0
    host_memory_gb: float = 1024.0
    cpu_adam_s_per_param: float = 2e-9
    disk_read_GBps: float = 3.0
    disk_write_GBps: float = 1.5
    extra: dict = field(default_factory=dict)

    @property
    def world(self) -> int:
        return self.nodes * self.accelerators_per_node


def load_hardware(path_or_name: str) -> HardwareSpec:
    """A spec from a YAML path, or a shipped one by name ("a100_80gb_cluster")."""
    path = Path(path_or_name)
    if not path.exists() and path_or_name in SHIPPED:
        text = resources.files("tetrad.strategy").joinpath(f"hardware/{path_or_name}.yaml").read_text()
    else:
        text = path.read_text()
    raw = yaml.safe_load(text)
    raw["intra_node"], raw["inter_node"] = Link(**raw["intra_node"]), Link(**raw["inter_node"])
    known = HardwareSpec.__dataclass_fields__
    extra = {k: raw.pop(k) for k in list(raw) if k not in known}
    return HardwareSpec(**raw, extra=extra)


def members_per_node(g: int, stride: int, per_node: int) -> int:
    """How many of a group's g members (ranks ``stride`` apart, aligned blocks) share a node."""
    if g * stride <= per_node:
        return g
    return max(1, min(g, per_node // stride))


def ring_time(kind: str, g: int, nbytes: float, bw: float, alpha: float) -> float:
    """Seconds of one collective on g ranks; nbytes is the full buffer (see profiler.collectives)."""
    if g <= 1:
        return 0.0
    if kind == "all_reduce":  # NCCL picks a tree for latency: 2 log2(g) steps
        return 2 * (g - 1) / g * nbytes / bw + 2 * math.ceil(math.log2(g)) * alpha
    if kind in ("all_gather", "reduce_scatter", "all_to_all"):  # rings only: g - 1 steps
        return (g - 1) / g * nbytes / bw + (g - 1) * alpha
    return alpha + nbytes / bw  # send_recv


class SpecCosts:
    """The cost model's inputs priced from a HardwareSpec (see the module docstring)."""

    same_pool = False

    def __init__(self, spec: HardwareSpec, args: ModelArgs, precision: str):
        self.spec, self.args, self.precision = spec, args, precision
        self.name = spec.name
        self.elem = 4 if precision == "fp32" else 2
        self.flops = spec.peak_tflops[precision] * 1e12 * spec.matmul_efficiency
        self.overlap = 1.0  # NCCL runs on its own SMs/copy engines beside compute
        self.device_budget = spec.memory_gb * 1e9 * spec.usable_memory_fraction
        self.host_budget = spec.host_memory_gb * 1e9 / spec.accelerators_per_node
        self.host_device_Bps = spec.host_device_GBps * 1e9
        self.disk_read_Bps = spec.disk_read_GBps * 1e9
        self.disk_write_Bps = spec.disk_write_GBps * 1e9
        self.peak_flops = spec.peak_tflops[precision] * 1e12

    def _layer_flops(self, tp: int, sp: int, b: int) -> tuple[float, float]:
        """(weight matmul FLOPs, attention-core FLOPs) of one layer's forward on one rank."""
        a = self.args
        hd, s = a.head_dim, a.seq_len
        weights = a.d_model * (a.n_heads + 2 * a.n_kv_heads) * hd + a.n_heads * hd * a.d_model
        weights += (3 if a.arch == "llama" else 2) * a.d_model * a.d_ff
        return 2 * b * (s / sp) * weights / tp, 4 * b * s * s * a.n_heads * hd / (tp * sp)

    def layer(self, tp: int, sp: int, b: int, policy: str) -> tuple[float, float]:
        mm, core = self._layer_flops(tp, sp, b)
        eltwise = 3 * self.act_bytes(tp, sp, b, "none") / (self.spec.memory_bandwidth_GBps * 1e9)
        fwd = (mm + core) / self.flops + eltwise
        bwd = 2 * fwd + {"none": 0.0, "selective": core / self.flops, "full": fwd}[policy]
        return fwd, bwd

    def head(self, tp: int, sp: int, b: int) -> tuple[float, float]:
        a = self.args
        fwd = 2 * b * (a.seq_len / sp) * a.d_model * a.vocab_size / tp / self.flops
        return fwd, 2 * fwd

    def act_bytes(self, tp: int, sp: int, b: int, policy: str) -> float:
        """Korthikanti et al. per layer without the s^2 term (flash attention), Ulysses on s/u."""
        s, h = self.args.seq_len / sp, self.args.d_model
        per = {"none": s * b * h * (10 + 24 / tp), "selective": s * b * h * (10 + 24 / tp),
               "full": 2 * s * b * h}[policy]
        return per * self.elem / 2

    def coll(self, kind: str, g: int, stride: int, nbytes: float) -> float:
        n = self.spec.accelerators_per_node
        k = members_per_node(g, stride, n)
        if k == g:
            link_bw, alpha = self.spec.intra_node.Bps, self.spec.intra_node.latency_us * 1e-6
        else:
            nics = (self.spec.inter_node.nics_per_node or n) / n
            link_bw = min(self.spec.intra_node.Bps, k * nics * self.spec.inter_node.Bps)
            alpha = self.spec.inter_node.latency_us * 1e-6
        return ring_time(kind, g, nbytes, link_bw, alpha)

    def adam(self, params: float) -> float:
        """The optimizer step is memory-bound: ~32 bytes read+written per parameter (fp32
        master, two moments, gradient, new weight) at HBM bandwidth."""
        return params * 32 / (self.spec.memory_bandwidth_GBps * 1e9)

    def host_adam(self, params: float) -> float:
        return params * self.spec.cpu_adam_s_per_param
