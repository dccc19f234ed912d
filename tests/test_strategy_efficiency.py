"""The spec cost model's per-operation terms against hand computations."""

import math

import pytest

from tetrad.models.args import ModelArgs
from tetrad.strategy.efficiency import (AttentionCurve, Efficiency, EfficiencyError, GemmCurve, Saturating,
                                        fit_gemm, fit_saturating)
from tetrad.strategy.hardware import HardwareError, load_hardware, spec_from_dict
from tetrad.strategy.layer_ops import layer_work, saved_bytes
from tetrad.models.counts import activation_bytes
from tetrad.strategy.software import Software
from tetrad.strategy.spec_costs import SpecCosts

MIB = 2 ** 20


def test_saturating_rate_is_the_alpha_beta_line():
    curve = Saturating(0.8, MIB)
    assert curve(MIB) == pytest.approx(0.4)                       # half the top at `half`
    assert curve.seconds(MIB, 1e9) == pytest.approx(MIB / (1e9 * 0.4))
    # (x + half) / (top * peak): a fixed cost of half / (top * peak) per transfer
    assert curve.seconds(3 * MIB, 1e9) - curve.seconds(2 * MIB, 1e9) == pytest.approx(MIB / 0.8e9)


def test_gemm_efficiency_and_roofline_by_hand():
    g = GemmCurve(top=0.8, half_dim=64)
    # 0.8 * 64/128 * 128/192 * 192/256 = 0.2
    assert g.efficiency(64, 128, 192) == pytest.approx(0.2)
    assert g.seconds(64, 128, 192, 1e12, 1e12, 2) == pytest.approx(2 * 64 * 128 * 192 / (1e12 * 0.2))
    # a matrix-vector product is memory-bound: 2 bytes x (m k + k n + m n) at 1e9 B/s
    assert g.seconds(1, 4096, 4096, 1e15, 1e9, 2) == pytest.approx(2 * (4096 + 4096 * 4096 + 4096) / 1e9)
    assert GemmCurve(0.8, 64, {"fp32": 0.5}).efficiency(1e9, 1e9, 1e9, "fp32") == pytest.approx(0.5)


def test_flash_attention_skips_the_causal_half():
    a = AttentionCurve(top=0.5, half_seq=512)
    assert a.efficiency(512) == pytest.approx(0.25)
    assert a.forward_seconds(4e12, 512, 1e12, causal=True) == pytest.approx(0.5 * 4e12 / 0.25e12)
    assert a.forward_seconds(4e12, 512, 1e12, causal=False) == pytest.approx(4e12 / 0.25e12)


def test_efficiency_section_errors_name_the_key():
    with pytest.raises(EfficiencyError, match=r"efficiency\.gemm\.top=1\.5: a fraction"):
        Efficiency.from_dict({"gemm": {"top": 1.5}})
    with pytest.raises(EfficiencyError, match=r"efficiency\.gemmm: unknown key"):
        Efficiency.from_dict({"gemmm": {}})
    with pytest.raises(EfficiencyError, match=r"efficiency\.attention\.half_seq=-1"):
        Efficiency.from_dict({"attention": {"half_seq": -1}})
    e = Efficiency.from_dict({"gemm": {"top": 0.6}, "intra_half_bytes": 1024})
    assert e.gemm.top == 0.6 and e.gemm.half_dim == GemmCurve().half_dim and e.intra_half_bytes == 1024


def test_fits_recover_known_curves():
    true = GemmCurve(top=0.7, half_dim=96)
    points = [(m, n, k, 2 * m * n * k / (1e12 * true.efficiency(m, n, k)))
              for m, n, k in ((64, 64, 64), (256, 512, 128), (1024, 1024, 1024), (4096, 256, 512))]
    got = fit_gemm(points, 1e12)
    assert got.half_dim == 96 and got.top == pytest.approx(0.7, rel=1e-9)
    rate, half = fit_saturating([(x, (x + 3000.0) / 5e9) for x in (1e3, 1e5, 1e7)])
    assert rate == pytest.approx(5e9, rel=1e-9) and half == pytest.approx(3000.0, rel=1e-6)


GPT = ModelArgs(arch="gpt", vocab_size=1000, d_model=256, n_layers=4, n_heads=8, seq_len=512, dropout=0.1)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_math_kernel_inventory_is_korthikanti(tp, policy):
    # GPT, d_ff = 4h, MHA, dropout on, materialised scores: the paper's Table 2, 16-bit.
    got = saved_bytes(GPT, tp, 1, 2, policy, elem=2, kernel="math")
    assert got == pytest.approx(activation_bytes(GPT.seq_len, 2, GPT.d_model, GPT.n_heads, t=tp, policy=policy))
    msp = saved_bytes(GPT, tp, 1, 2, policy, elem=2, kernel="math", msp=True)
    assert msp == pytest.approx(activation_bytes(GPT.seq_len, 2, GPT.d_model, GPT.n_heads, t=tp, policy=policy, megatron_sp=True))


def test_flash_inventory_of_llama3_8b_by_hand():
    a = ModelArgs(arch="llama", vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                  d_ff=14336, seq_len=8192)
    h, f, q, kv = 4096, 14336, 4096, 1024
    none = 2 * (4 * h + (q + 2 * kv) + q + 4 * f) + 4 * 32     # + fp32 log-sum-exp per head
    assert saved_bytes(a, 1, 1, 1, "none", 2) == pytest.approx(none * 8192)
    assert saved_bytes(a, 1, 1, 1, "selective", 2) == pytest.approx((none - 128) * 8192)
    assert saved_bytes(a, 1, 1, 1, "full", 2) == pytest.approx(2 * h * 8192)
    # torchtitan's per-op SAC: the block input, the 1st/3rd/5th/7th matmul outputs (q, v, gate,
    # down), the attention output and its log-sum-exp
    op = 2 * h + 2 * (q + kv + f + h) + 2 * q + 128
    assert op == 63616
    assert saved_bytes(a, 1, 1, 1, "op_sac", 2) == pytest.approx(op * 8192)
    assert saved_bytes(a, 1, 1, 1, "every_2nd", 2) == pytest.approx((none + 2 * h) / 2 * 8192)


def test_layer_work_counts_the_model_flops():
    a = ModelArgs(arch="llama", vocab_size=64, d_model=128, n_layers=2, n_heads=8, n_kv_heads=2, seq_len=256)
    for tp, sp in ((1, 1), (2, 1), (2, 2)):
        w = layer_work(a, tp, sp, b=3)
        tokens = 3 * 256 / sp
        weights = a.d_model * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim + a.n_heads * a.head_dim * a.d_model
        weights += 3 * a.d_model * a.d_ff
        assert sum(2 * g.m * g.n * g.k for g in w.gemms) == pytest.approx(2 * tokens * weights / tp)
        assert w.attn_flops == pytest.approx(4 * 3 * 256 ** 2 * a.n_heads * a.head_dim / (tp * sp))


def _flat_spec(**over):
    raw = {"name": "flat", "nodes": 2, "accelerators_per_node": 4, "peak_tflops": {"bf16": 100.0},
           "memory_gb": 80, "context_gb": 0, "memory_bandwidth_GBps": 1e9,
           "intra_node": {"bandwidth_GBps": 100.0, "efficiency": 1.0, "latency_us": 0.0},
           "inter_node": {"bandwidth_GBps": 10.0, "efficiency": 0.5, "latency_us": 0.0, "nics_per_node": 4},
           "efficiency": {"gemm": {"top": 0.5, "half_dim": 0}, "attention": {"top": 0.25, "half_seq": 0},
                          "memory_top": 1.0, "intra_half_bytes": 0, "inter_half_bytes": 1e6}}
    raw.update(over)
    return spec_from_dict(raw, "test", calib={})


def test_layer_time_is_the_sum_of_its_operations():
    a = ModelArgs(arch="llama", vocab_size=64, d_model=256, n_layers=2, n_heads=4, seq_len=128)
    costs = SpecCosts(_flat_spec(), a, "bf16", calib={})
    w = layer_work(a, 1, 1, 2)
    gemm = sum(2 * g.m * g.n * g.k for g in w.gemms) / (100e12 * 0.5)
    attn = 0.5 * w.attn_flops / (100e12 * 0.25)                  # causal half at top 0.25
    elt = w.eltwise_elems * 2 / 1e18                             # HBM "infinitely" fast here
    fwd, bwd = costs.layer(1, 1, 2, "none")
    assert fwd == pytest.approx(gemm + attn + elt)
    assert bwd == pytest.approx(2 * gemm + 2.5 * attn + 2 * elt)
    assert costs.layer(1, 1, 2, "full")[1] == pytest.approx(bwd + fwd)
    assert costs.layer(1, 1, 2, "selective")[1] == pytest.approx(bwd + attn)
    odd = sum(2 * g.m * g.n * g.k for g in w.gemms[1::2]) / (100e12 * 0.5)   # k, o, up re-run
    assert costs.layer(1, 1, 2, "op_sac")[1] == pytest.approx(bwd + odd + elt)


def test_collectives_pay_a_size_dependent_bus_efficiency():
    a = ModelArgs(arch="llama", vocab_size=64, d_model=64, n_layers=2, n_heads=4, seq_len=64)
    costs = SpecCosts(_flat_spec(), a, "bf16", calib={})
    n = 8e6
    # inside a node: 100 GB/s at efficiency 1; all-gather moves (g-1)/g of the buffer
    assert costs.coll("all_gather", 4, 1, n) == pytest.approx(3 / 4 * n / 100e9)
    # across nodes (8 ranks, stride 1, 4 per node): 4 NICs x 10 GB/s x 0.5 x n/(n + 1e6)
    bus = 4 * 10e9 * 0.5 * n / (n + 1e6)
    assert costs.coll("all_gather", 8, 1, n) == pytest.approx(7 / 8 * n / bus)


def test_power_capped_variant_and_memory_in_gib():
    spec = load_hardware("h100_96gb_500w")
    assert spec.power_share() == pytest.approx(0.844 + (1 - 0.844) * 100 / 300)
    assert spec.peak_flops("bf16") == pytest.approx(989e12 * spec.power_share())
    assert spec.device_bytes() == pytest.approx((96 - 0.5) * 2 ** 30)
    full = load_hardware("h100_sxm")
    assert full.power_share() == 1.0 and full.peak_flops("bf16") == pytest.approx(989e12)
    with pytest.raises(HardwareError, match="no peak for precision 'fp8'"):
        full.peak_flops("fp8")


def test_shipped_specs_load_and_old_names_still_work():
    from tetrad.strategy.hardware import ALIASES, SHIPPED

    for name in (*SHIPPED, *ALIASES):
        spec = load_hardware(name)
        # volta (the ZeRO++ paper's cluster) has no fitted curves: it runs on the defaults
        assert spec.family in ("ampere", "hopper", "volta") and spec.efficiency.gemm.top <= 1
    assert load_hardware("a100_80gb_cluster").name == load_hardware("a100_80gb").name


def test_spec_errors_name_the_file_and_key(tmp_path):
    path = tmp_path / "hw.yaml"
    path.write_text("name: x\nnodes: 1\naccelerators_per_node: 8\npeak_tflops: {bf16: 1}\nmemory_gb: 0\n"
                    "intra_node: {bandwidth_GBps: 1}\ninter_node: {bandwidth_GBps: 1}\n")
    with pytest.raises(HardwareError, match=rf"{path}: memory_gb=0 must be > 0"):
        load_hardware(str(path))
    path.write_text("name: x\nnodes: 1\naccelerators_per_node: 8\npeak_tflops: {bf16: 1}\nmemory_gb: 8\n"
                    "intra_node: {bandwidth_GBps: 1}\ninter_node: {bandwidth_GBps: 1}\n"
                    "efficiency: {gemm: {top: 2}}\n")
    with pytest.raises(HardwareError, match=r"efficiency\.gemm\.top=2"):
        load_hardware(str(path))


def test_software_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"sw\.attn: unknown key"):
        Software.from_dict({"attn": "flash"}, "sw")
    with pytest.raises(ValueError, match=r"sw\.gather_bytes=3"):
        Software.from_dict({"gather_bytes": 3}, "sw")
    assert math.isclose(Software.from_dict({"loss_bytes_per_logit": 4}).loss_bytes_per_logit, 4.0)


def test_a_spec_with_the_old_flat_efficiency_keeps_its_meaning():
    spec = _flat_spec(matmul_efficiency=0.6, efficiency={})
    assert spec.efficiency.gemm.top == 0.6 and spec.efficiency.gemm.half_dim == 0
    assert spec.efficiency.gemm.efficiency(16, 16, 16) == pytest.approx(0.6)   # no size penalty
