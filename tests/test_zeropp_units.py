"""ZeRO++'s parts on their own: the int8 block quantizer's error bound, the byte counter
against hand computations, and every new collective against the unsharded computation
(four gloo ranks standing for two nodes of two: ``ranks_per_node`` 2)."""

from __future__ import annotations

import pytest
import torch

from harness import run_distributed
from tetrad.traffic import Traffic
from tetrad.zero.quant import BLOCK, dequantize, error_bound, quantize, wire_bytes


def _samples() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    spiky = torch.randn(3 * BLOCK + 17, generator=g)
    spiky[5] = 300.0  # one outlier flattens only its own block
    zeros = torch.zeros(2 * BLOCK)
    zeros[BLOCK:] = torch.randn(BLOCK, generator=g) * 1e-6
    return [torch.randn(1000, generator=g), spiky, zeros, torch.randn(7, generator=g) * 1e4]


@pytest.mark.parametrize("i", range(4))
def test_quantizer_error_within_half_a_step_of_its_block(i):
    x = _samples()[i]
    q, scales = quantize(x)
    assert q.dtype == torch.int8 and q.numel() == -(-x.numel() // BLOCK) * BLOCK
    back = dequantize(q, scales, x.numel())
    err, bound = (back - x).abs(), error_bound(x)
    # half an int8 step, plus fp32 rounding of x / s and s * q (~1e-7 relative)
    assert bool((err <= bound * (1 + 1e-5) + 1e-12).all()), float((err - bound).max())
    assert float(err.max()) <= float(x.abs().max()) / 254 * (1 + 1e-5)
    print(f"\nquantizer sample {i}: max error {float(err.max()):.3e}, bound {float(bound.max()):.3e}")


def test_quantizer_per_block_scales_keep_an_outlier_local():
    x = _samples()[1]
    back = dequantize(*quantize(x), x.numel())
    # blocks without the outlier keep their own fine step
    assert float((back[BLOCK:] - x[BLOCK:]).abs().max()) < 0.02


def test_wire_bytes_by_hand():
    assert wire_bytes(256) == 256 + 4
    assert wire_bytes(257) == 512 + 8
    assert wire_bytes(1) == 256 + 4


def test_traffic_counts_by_hand():
    """World 8, 4 ranks per node, rank 1: 3 peers on its node, 4 on the other."""
    t = Traffic(4, 1, 8)
    assert (t.split(None), t.nodes, t.spans_nodes) == ((3, 4), 2, True)
    t.all_gather(None, 100)            # its 100-byte shard to each of 7 peers
    assert t.counts == {"intra": 300, "inter": 400}
    t.take()
    t.all_reduce(None, 800)            # 2/8 of 800 bytes to each peer
    assert t.take() == {"intra": 600, "inter": 800}
    t.send(3, 10)
    t.send(4, 20)
    assert t.take() == {"intra": 10, "inter": 20}
    assert not Traffic(4, 0, 4).spans_nodes
    with pytest.raises(ValueError, match="ranks_per_node=0"):
        Traffic(0, 0, 4)


# --------------------------------------------------------------------- on four gloo ranks
def _collectives(rank: int, world: int) -> dict:
    import torch.distributed as dist

    from tetrad.zero.comm import all_gather, all_reduce_avg, all_to_all, reduce_scatter_avg
    from tetrad.zero.zeropp import qgz_error_bound, quantized_all_gather, quantized_reduce_scatter

    k = 2  # ranks per node
    intra, _ = dist.new_subgroups_by_enumeration([[0, 1], [2, 3]])
    inter, _ = dist.new_subgroups_by_enumeration([[0, 2], [1, 3]])
    traffic = Traffic(k, rank, world)
    n, size = world, 3 * BLOCK + 5
    full = [torch.randn(n * size, generator=torch.Generator().manual_seed(10 + r)) for r in range(n)]
    mine = full[rank].clone()
    out = {}

    # exact collectives against the unsharded computation
    avg = sum(full) / n
    shard = torch.empty(size)
    reduce_scatter_avg(shard, mine.clone(), None, traffic).wait()
    out["rs"] = float((shard - avg[rank * size:(rank + 1) * size]).abs().max())
    gathered = torch.empty(n * size)
    all_gather(gathered, full[rank][:size].clone(), None, traffic).wait()
    out["ag"] = float((gathered - torch.cat([f[:size] for f in full])).abs().max())
    x = mine.clone()
    all_reduce_avg(x, None, traffic).wait()
    out["ar"] = float((x - avg).abs().max())
    recv = torch.empty(n * size)
    all_to_all(recv, mine.clone(), None, traffic).wait()
    out["a2a"] = float((recv - torch.cat([f[rank * size:(rank + 1) * size] for f in full])).abs().max())
    out["exact_bytes"] = traffic.take()

    # qwZ: every rank's shard, dequantized, within the quantizer's bound
    q_out = torch.empty(n * size)
    quantized_all_gather(q_out, full[rank][:size].clone(), None, traffic).wait()
    want = torch.cat([f[:size] for f in full])
    bound = torch.cat([error_bound(f[:size]) for f in full])
    out["qwz_ok"] = bool(((q_out - want).abs() <= bound * (1 + 1e-5) + 1e-12).all())
    out["qwz_err"] = float((q_out - want).abs().max())
    out["qwz_bytes"] = traffic.take()

    # qgZ: the hierarchical quantized reduce-scatter against the exact average
    g_out = torch.empty(size)
    quantized_reduce_scatter(g_out, mine.clone(), intra, inter, traffic).wait()
    ref = avg[rank * size:(rank + 1) * size]
    out["qgz_err"] = float((g_out - ref).abs().max())
    out["qgz_bound"] = qgz_error_bound(full, k)
    out["qgz_rel"] = float((g_out - ref).norm() / ref.norm())
    out["qgz_bytes"] = traffic.take()
    return out


@pytest.fixture(scope="module")
def collectives() -> list[dict]:
    return run_distributed(_collectives, 4, timeout=120)


def test_exact_collectives_match_the_unsharded_computation(collectives):
    for r in collectives:
        assert max(r["rs"], r["ag"], r["ar"], r["a2a"]) < 1e-6, r


def test_exact_collective_bytes_by_hand(collectives):
    """4 ranks, 2 per node, S = size elements x 4 bytes: each collective sends S to each of
    its 3 peers (all-reduce: 2/4 of its 4S buffer = 2S to each), 1 near and 2 far."""
    S = (3 * BLOCK + 5) * 4
    per_peer = S + S + 2 * S + S  # reduce-scatter, all-gather, all-reduce, all-to-all
    for r in collectives:
        assert r["exact_bytes"] == {"intra": per_peer, "inter": 2 * per_peer}


def test_qwz_gather_within_the_bound_and_its_bytes(collectives):
    size = 3 * BLOCK + 5
    for r in collectives:
        assert r["qwz_ok"], r["qwz_err"]
        wire = wire_bytes(size)  # int8 values and fp32 scales, to each peer
        assert r["qwz_bytes"] == {"intra": wire, "inter": 2 * wire}
    print(f"\nqwZ all-gather: max error {max(r['qwz_err'] for r in collectives):.3e}")


def test_qgz_reduce_within_the_bound_and_its_bytes(collectives):
    """Bytes: the intra-node all-to-all sends the node peer its half of the bucket (2 node
    chunks of ``size``), quantized row by row; the inter-node one sends the other node one
    chunk of the partial: 1/k of the gradient crosses, in int8 (ZeRO++'s qgZ volume)."""
    size = 3 * BLOCK + 5
    for r in collectives:
        assert r["qgz_err"] <= r["qgz_bound"], (r["qgz_err"], r["qgz_bound"])
        assert r["qgz_bytes"] == {"intra": wire_bytes(2 * size), "inter": wire_bytes(size)}
    print(f"\nqgZ reduce-scatter: max error {max(r['qgz_err'] for r in collectives):.3e} "
          f"(bound {collectives[0]['qgz_bound']:.3e}), relative L2 {max(r['qgz_rel'] for r in collectives):.2e}")
