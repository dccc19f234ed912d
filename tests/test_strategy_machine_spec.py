"""This machine's kernel rates (tetrad.profiler.kernels) and the spec fitted to them."""

import pytest
import torch

from tetrad.models.args import ModelArgs
from tetrad.profiler import kernels
from tetrad.strategy.efficiency import GemmCurve
from tetrad.strategy.hardware import spec_from_dict
from tetrad.strategy.machine_spec import efficiency_from_profile, spec_from_profile
from tetrad.strategy.spec_costs import SpecCosts

CPU = torch.device("cpu")


def test_kernel_points_are_measured_on_the_given_device():
    gemm = kernels.measure_gemms(CPU, torch.float32, reps=1, shapes=((32, 32, 32), (64, 32, 16)))
    assert [(p["m"], p["n"], p["k"]) for p in gemm] == [(32, 32, 32), (64, 32, 16)] and all(p["s"] > 0 for p in gemm)
    att = kernels.measure_attention(CPU, torch.float32, reps=1, seqs=(32, 64), heads=2, head_dim=16)
    assert [p["seq"] for p in att] == [32, 64] and all(p["fwd_s"] > 0 and p["bwd_s"] >= 0 for p in att)
    mem = kernels.measure_memory_bandwidth(CPU, torch.float32, numel=1 << 12, reps=1)
    assert mem["bytes"] == 3 * 4 * (1 << 12) and mem["s"] > 0
    assert kernels.measure_host_device(CPU) is None       # no accelerator: nothing to copy


def _profile():
    """A profile whose kernel points follow known curves (as a GPU machine would report them)."""
    curve = GemmCurve(top=1.0, half_dim=64)
    peak = 5e13
    gemm = [{"m": m, "n": n, "k": k, "s": 2 * m * n * k / (peak * curve.efficiency(m, n, k))}
            for m, n, k in kernels.GEMM_SHAPES]
    att = [{"seq": s, "heads": 4, "head_dim": 64, "fwd_s": 0.5 * 4 * s * s * 4 * 64 / (peak * 0.4 * s / (s + 256)),
            "bwd_s": 2.0 * 0.5 * 4 * s * s * 4 * 64 / (peak * 0.4 * s / (s + 256))} for s in kernels.ATTENTION_SEQS]
    return {
        "key": {"hardware": {"world": 16, "local_world": 8, "cpu": "x", "accelerator": {"name": "G"}},
                "model": {"precision": "bf16"}},
        "kernels": {"dtype": "bfloat16", "device": "cuda", "gemm": gemm, "attention": att,
                    "memory": {"bytes": 3e9, "s": 1e-3},
                    "host_device": [{"bytes": n, "s": (n + 2e5) / 2e10} for n in (1 << 16, 1 << 20, 1 << 24)]},
        "disk_by_size": [{"bytes": n, "reads": 1, "s": (n + 1e6) / 2e9} for n in (1 << 16, 1 << 20, 1 << 23)],
        "collectives": {"all_reduce": {"8/intra": {"alpha_s": 2e-5, "beta_s_per_byte": 1 / 2e11},
                                       "16/inter": {"alpha_s": 5e-5, "beta_s_per_byte": 1 / 4e10}}},
        "memory": {"device": "cuda", "device_total_bytes": 80 * 2 ** 30, "host": {"total_bytes": 2 ** 40}},
        "disk": {"read_Bps": 2e9, "write_Bps": 1e9}, "adam_s_per_param": 1e-11,
    }


def test_curves_are_recovered_from_the_points():
    eff, peak, mem = efficiency_from_profile(_profile())
    assert peak == pytest.approx(5e13, rel=1e-9) and eff["gemm"]["half_dim"] == 64
    assert eff["attention"]["top"] == pytest.approx(0.4, rel=1e-3) and eff["attention"]["half_seq"] == 256
    assert eff["attention"]["backward_ratio"] == pytest.approx(2.0)
    assert mem == pytest.approx(3e12)
    assert eff["intra_half_bytes"] == pytest.approx(2e-5 * 2e11)       # alpha / beta
    assert eff["host_device"]["half"] == pytest.approx(2e5, rel=1e-6)
    assert eff["disk"]["half"] == pytest.approx(1e6, rel=1e-6)


def test_the_machine_spec_loads_and_prices_a_plan():
    spec = spec_from_dict(spec_from_profile(_profile()), "machine", calib={})
    assert spec.nodes == 2 and spec.accelerators_per_node == 8
    assert spec.peak_flops("bf16") == pytest.approx(5e13, rel=1e-6)
    assert spec.host_device_GBps == pytest.approx(20.0, rel=1e-3)
    a = ModelArgs(arch="llama", vocab_size=256, d_model=512, n_layers=2, n_heads=8, seq_len=512)
    fwd, bwd = SpecCosts(spec, a, "bf16", calib={}).layer(1, 1, 1, "none")
    assert 0 < fwd < bwd


def test_an_old_profile_says_how_to_get_kernel_points():
    with pytest.raises(ValueError, match="re-profile with `tetrad profile --force`"):
        efficiency_from_profile({"memory": {}})
