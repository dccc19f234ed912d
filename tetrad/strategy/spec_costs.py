"""The cost model's inputs priced from a cluster spec: each layer operation by operation.

A layer's forward is the sum of its GEMMs (each at the GEMM curve's rate for its (m, n, k)
and dtype), its attention core (the flash curve at its sequence length, or the math kernel's
batched GEMMs and softmax passes) and its element-wise traffic at HBM speed
(``tetrad.strategy.layer_ops`` lists them). Backward: each GEMM's two gradient GEMMs
(input: (m, k, n), weight: (k, n, m)), the attention backward, twice the element-wise
traffic, and what the recompute policy re-runs. The head: the output projection's GEMMs,
the loss's passes over the logits, the embedding's lookup and dense gradient.

Collectives are bandwidth-optimal rings (``hardware.ring_time``) at the link's bus
bandwidth for the message's size: top = the link's ``efficiency``, halved at the spec's
``efficiency.{intra,inter}_half_bytes``. Placement: a group of g ranks a stride apart has
k members per node (``members_per_node``); k = g runs over NVLink, otherwise the ring's
inter-node hop is shared by the k members' NICs.

``software`` says how the framework runs (tetrad's engine unless a published run says
otherwise): its attention kernel, loss buffers, reduction and gather precision, overlap.
"""

from __future__ import annotations

from functools import lru_cache

from tetrad.models.args import ModelArgs
from tetrad.strategy.hardware import GIB, HardwareSpec, calibration, members_per_node, ring_time
from tetrad.strategy.layer_ops import layer_work, recomputed, saved_bytes
from tetrad.strategy.software import TETRAD, Software


class SpecCosts:
    """Cost inputs for a cluster we do not have, from its HardwareSpec."""

    same_pool = False
    overlap = 1.0  # NCCL runs on its own SMs / copy engines beside compute

    def __init__(self, spec: HardwareSpec, args: ModelArgs, precision: str,
                 software: Software = TETRAD, calib: dict | None = None):
        self.spec, self.args, self.precision, self.software = spec, args, precision, software
        calib = calibration() if calib is None else calib
        self.name = spec.name
        self.elem = 4 if precision == "fp32" else 2
        self.eff = spec.efficiency
        self.peak_flops = spec.peak_flops(precision)
        self.mem_Bps = spec.memory_bandwidth_GBps * 1e9
        self.fragmentation = float((calib.get("memory") or {}).get("fragmentation", 0.0))
        self.device_budget = spec.device_bytes()
        self.host_budget = spec.host_memory_gb * GIB / spec.accelerators_per_node
        self.host_device_Bps = spec.host_device_GBps * 1e9
        self.disk_read_Bps = spec.disk_read_GBps * 1e9
        self.disk_write_Bps = spec.disk_write_GBps * 1e9
        self.disk_budget = None if spec.disk_gb is None else spec.disk_gb * 1e9 / spec.accelerators_per_node
        self.grad_overlap = 1.0 if software.grad_overlap else 0.0
        self.grad_elem = software.grad_bytes or self.elem
        self.grad_reduce_elem = software.grad_reduce_bytes or self.grad_elem
        self.gather_elem = software.gather_bytes or self.elem
        self.zero3_prefetch = software.zero3_prefetch
        self.reduce_every_micro_batch = software.reduce_every_micro_batch
        self.loss_bytes_per_logit = software.loss_bytes_per_logit
        self.nccl_bytes_per_group = spec.nccl_mb_per_group * 2 ** 20
        self.ranks_per_node = spec.accelerators_per_node
        self._layer = lru_cache(maxsize=None)(self._layer_uncached)

    # --- compute --------------------------------------------------------------------------
    def _gemm(self, m: float, n: float, k: float) -> float:
        return self.eff.gemm.seconds(m, n, k, self.peak_flops, self.mem_Bps, self.elem, self.precision)

    def _bytes(self, nbytes: float) -> float:
        return nbytes / (self.mem_Bps * self.eff.memory_top)

    def _attention(self, work) -> tuple[float, float]:
        """(forward, backward) seconds of the attention core."""
        if work.attn_flops == 0:
            return 0.0, 0.0
        if self.software.attention == "flash":
            curve = self.eff.attention
            fwd = curve.forward_seconds(work.attn_flops, work.attn_seq, self.peak_flops, True)
            return fwd, curve.backward_ratio * fwd
        s, hd, bh = work.attn_seq, self.args.head_dim, work.attn_heads
        qk, pv = self._gemm(s, s, hd), self._gemm(s, hd, s)
        scores = bh * s * s * self.elem
        passes = 2.0 + (2.5 if self.args.dropout > 0 else 0.0)    # softmax (+ dropout) read/write
        fwd = bh * (qk + pv) + self._bytes(passes * scores)
        bwd_gemm = bh * (self._gemm(s, hd, s) + self._gemm(hd, s, s) + self._gemm(s, s, hd)
                         + self._gemm(s, hd, s))
        bwd = bwd_gemm + self._bytes((3.0 + (2.0 if self.args.dropout > 0 else 0.0)) * scores)
        return fwd, bwd

    def _layer_uncached(self, tp: int, sp: int, b: int, policy: str, msp: bool) -> tuple[float, float]:
        work = layer_work(self.args, tp, sp, b, msp)
        gemm_f = sum(self._gemm(g.m, g.n, g.k) for g in work.gemms)
        gemm_b = sum(self._gemm(g.m, g.k, g.n) + self._gemm(g.k, g.n, g.m) for g in work.gemms)
        attn_f, attn_b = self._attention(work)
        elt = self._bytes(work.eltwise_elems * self.elem)
        again, g_share, a_share, e_share = recomputed(work, policy)
        redo = g_share * sum(self._gemm(g.m, g.n, g.k) for g in again) + a_share * attn_f + e_share * elt
        return gemm_f + attn_f + elt, gemm_b + attn_b + 2 * elt + redo

    def layer(self, tp: int, sp: int, b: int, policy: str, msp: bool = False) -> tuple[float, float]:
        return self._layer(tp, sp, b, policy, msp)

    def head(self, tp: int, sp: int, b: int) -> tuple[float, float]:
        """The output projection, the loss over the logits and the embedding."""
        a = self.args
        tokens, vocab = b * a.seq_len / sp, a.vocab_size / tp
        proj_f = self._gemm(tokens, vocab, a.d_model)
        proj_b = self._gemm(tokens, a.d_model, vocab) + self._gemm(a.d_model, vocab, tokens)
        loss = self._bytes(self.loss_bytes_per_logit * tokens * vocab)
        embed_f = self._bytes(2 * tokens * a.d_model * self.elem)
        embed_b = self._bytes(3 * vocab * a.d_model * self.elem)   # dense gradient: zero, add, accumulate
        return proj_f + loss + embed_f, proj_b + loss + embed_b

    # --- memory ---------------------------------------------------------------------------
    def layer_activation_bytes(self, tp: int, sp: int, b: int, policy: str, msp: bool = False) -> float:
        return saved_bytes(self.args, tp, sp, b, policy, self.elem, self.software.attention, msp)

    def act_bytes(self, tp: int, sp: int, b: int, policy: str) -> float:
        return self.layer_activation_bytes(tp, sp, b, policy)

    # --- communication --------------------------------------------------------------------
    def coll(self, kind: str, g: int, stride: int, nbytes: float) -> float:
        if g <= 1:
            return 0.0
        spec = self.spec
        n = spec.accelerators_per_node
        k = members_per_node(g, stride, n)
        if k == g:
            link, half = spec.intra_node, self.eff.intra_half_bytes
            peak = link.bandwidth_GBps * 1e9
        else:
            link, half = spec.inter_node, self.eff.inter_half_bytes
            nics = (link.nics_per_node or n) / n
            peak = min(spec.intra_node.bandwidth_GBps, k * nics * link.bandwidth_GBps) * 1e9
        bus = link.efficiency * nbytes / (nbytes + half) if nbytes > 0 else link.efficiency
        return ring_time(kind, g, nbytes, peak * bus, link.latency_us * 1e-6)

    def transfer(self, kind: str, nbytes: float, chunk: float) -> float:
        """Seconds to copy ``nbytes`` in ``chunk``-byte pieces host<->device or to/from disk."""
        if nbytes <= 0:
            return 0.0
        curve, rate = {"host_device": (self.eff.host_device, self.host_device_Bps),
                       "disk_read": (self.eff.disk, self.disk_read_Bps),
                       "disk_write": (self.eff.disk, self.disk_write_Bps)}[kind]
        chunk = max(1.0, min(chunk, nbytes))
        return nbytes / chunk * curve.seconds(chunk, rate)

    def quantize(self, elems: float, elem: int) -> float:
        """ZeRO++'s int8 block quantization and dequantization of ``elems``: memory-bound, each
        reads and writes every element once (elem bytes one way, 1 the other)."""
        return self._bytes(2 * elems * (elem + 1))

    def adam(self, params: float) -> float:
        """Memory-bound: ~32 bytes read + written per parameter (fp32 master, two moments,
        gradient, new weight) at the element-wise share of HBM bandwidth."""
        return self._bytes(params * 32)

    def host_adam(self, params: float) -> float:
        return params * self.spec.cpu_adam_s_per_param
