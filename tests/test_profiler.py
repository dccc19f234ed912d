"""The profiler: shard shapes, alpha-beta fits, stored profiles, a quick profile of a tiny model."""

import pytest
import torch

from harness import run_distributed
from tetrad.models.args import ModelArgs
from tetrad.profiler import ProfileOptions, load_or_profile, shard_shapes
from tetrad.profiler import collectives, layers, store
from tetrad.profiler.report import paper_layer_bytes

TINY = ModelArgs(arch="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, seq_len=32)


def test_shard_block_holds_a_tp_ranks_share():
    block = layers.shard_block(TINY, 2, torch.float32, torch.device("cpu"))
    assert block.attn.q_proj.out_features == 16 and block.attn.o_proj.in_features == 16
    assert block.mlp.down_proj.in_features == TINY.d_ff // 2
    out = block(torch.randn(2, TINY.seq_len, TINY.d_model))
    assert out.shape == (2, TINY.seq_len, TINY.d_model)


def test_shard_shapes_follow_heads_and_world():
    assert shard_shapes(TINY, 4) == [(1, 1), (1, 2), (1, 4), (2, 1), (2, 2), (4, 1)]
    odd = ModelArgs(arch="gpt", vocab_size=64, d_model=48, n_layers=1, n_heads=3, seq_len=32)
    assert shard_shapes(odd, 2) == [(1, 1)]


def test_alpha_beta_fit_recovers_a_line():
    points = [(n, 1e-4 + 2e-9 * n) for n in (1 << 10, 1 << 14, 1 << 18, 1 << 20)]
    alpha, beta = collectives.fit(points)
    assert alpha == pytest.approx(1e-4, rel=1e-6) and beta == pytest.approx(2e-9, rel=1e-6)


def test_a_profile_is_reused_only_when_it_matches(tmp_path):
    path = tmp_path / "p.json"
    opts = ProfileOptions(mbs=[1], reps=1, disk_bytes=1 << 20)
    first, reused = load_or_profile(TINY, "fp32", 1, path=path, opts=opts)
    assert not reused and first["version"] == store.VERSION and first["layers"]
    assert [r["mbs"] for r in first["micro_batch"]] == [1]  # the whole model, per micro-batch size
    assert all(r["fwd_s"] > 0 and r["bwd_s"] > 0 for r in first["micro_batch"])
    # kernel rates by size, the points a spec of this machine is fitted to
    assert first["kernels"]["gemm"] and first["kernels"]["attention"] and first["disk_by_size"]
    again, reused = load_or_profile(TINY, "fp32", 1, path=path, opts=opts)
    assert reused and again["key"] == first["key"]
    wider = ModelArgs(arch="llama", vocab_size=64, d_model=64, n_layers=2, n_heads=4, seq_len=32)
    _, reused = load_or_profile(wider, "fp32", 1, path=path, opts=opts)
    assert not reused  # another shape re-measures
    _, reused = load_or_profile(wider, "fp32", 1, path=path, opts=opts, force=False)
    assert reused
    _, reused = load_or_profile(wider, "fp32", 1, path=path, opts=opts, force=True)
    assert not reused


def test_measured_activations_agree_with_korthikanti():
    args = ModelArgs(arch="gpt", vocab_size=64, d_model=64, n_layers=1, n_heads=4, seq_len=64, dropout=0.1)
    for tp in (1, 2):
        got = layers.measure_activations(args, tp, 1, 2, torch.float32, torch.device("cpu"))["bytes"]
        for policy, n in got.items():
            ratio = n / paper_layer_bytes(args, tp, 1, 2, policy, "fp32")
            assert 0.8 < ratio < 1.3, (tp, policy, ratio)


def _collectives(rank, world):
    return collectives.measure_all([1 << 12, 1 << 16], 1, torch.device("cpu"), world)


@pytest.mark.slow
def test_collectives_are_fitted_on_real_groups():
    fits = run_distributed(_collectives, 2)[0]
    assert set(fits) == set(collectives.KINDS)
    for kind in collectives.KINDS:
        f = fits[kind]["2/intra"]
        assert f["alpha_s"] >= 0 and f["beta_s_per_byte"] >= 0 and len(f["points"]) == 2
