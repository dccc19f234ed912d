"""Ring attention (context parallelism), forward and backward, against full attention.

Every rank builds the same global q, k, v and upstream gradient (same seeds), runs the ring on
its cp shard (zigzag or contiguous), and compares its output and its shard of dq, dk, dv with
what one process computes on the whole sequence with PyTorch's SDPA: causal and not, with
and without GQA, with the load-balanced and the contiguous split. Also the split helpers, the
positions, the per-rank work the zigzag split evens out, and the Ulysses x ring (USP) nesting.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from harness import run_distributed
from tetrad.parallel.context import (block_work, local_positions, shard_sequence, unshard_sequence)


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _reference(q, k, v, causal):
    rep = q.shape[1] // k.shape[1]
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(qq, kk.repeat_interleave(rep, 1), vv.repeat_interleave(rep, 1),
                                         is_causal=causal)
    return out, (qq, kk, vv)


def _check_ring(rank: int, world: int) -> list[str]:
    import torch.distributed as dist

    from tetrad.parallel.context import ring_attention

    group = dist.group.WORLD
    done = []
    for causal, balance, kv_heads in itertools.product((True, False), (True, False), (4, 2)):
        b, h, s, d = 2, 4, 8 * world, 8
        q, k, v = _rand(b, h, s, d, seed=1), _rand(b, kv_heads, s, d, seed=2), _rand(b, kv_heads, s, d, seed=3)
        g = _rand(b, h, s, d, seed=4)
        want, leaves = _reference(q, k, v, causal)
        (want * g).sum().backward()
        mine = lambda t: shard_sequence(t, 2, world, rank, balance)  # noqa: E731
        lq, lk, lv = (mine(t).clone().requires_grad_() for t in (q, k, v))
        got = ring_attention(lq, lk, lv, group, causal=causal, balance=balance)
        (got * mine(g)).sum().backward()
        name = f"causal={causal} balance={balance} kv_heads={kv_heads}"
        torch.testing.assert_close(got, mine(want.detach()), rtol=1e-10, atol=1e-10, msg=f"fwd {name}")
        for label, local, full in zip("qkv", (lq, lk, lv), leaves):
            torch.testing.assert_close(local.grad, mine(full.grad), rtol=1e-10, atol=1e-10,
                                       msg=f"d{label} {name}")
        done.append(name)
    return done


def _check_usp(rank: int, world: int) -> bool:
    """Ulysses (sp=2, heads) around ring (cp=2) on a 2 x 2 mesh equals full attention."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tetrad.models.transformer import CoreAttention
    from tetrad.parallel.context import RingAttention
    from tetrad.parallel.sequence import UlyssesAttention

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("cp", "sp"))
    cp_rank, sp_rank = mesh.get_local_rank("cp"), mesh.get_local_rank("sp")
    b, h, s, d = 1, 4, 16, 4
    q, k, v, g = (_rand(b, h, s, d, seed=i) for i in range(4))
    want, leaves = _reference(q, k, v, True)
    (want * g).sum().backward()

    def mine(t):  # cp zigzag first, then sp's contiguous slice of the cp-local sequence
        return shard_sequence(t, 2, 2, cp_rank, True).chunk(2, 2)[sp_rank]

    attn = UlyssesAttention(RingAttention(CoreAttention(), mesh.get_group("cp"), balance=True),
                            mesh.get_group("sp"))
    lq, lk, lv = (mine(t).clone().requires_grad_() for t in (q, k, v))
    got = attn(lq, lk, lv)
    (got * mine(g)).sum().backward()
    torch.testing.assert_close(got, mine(want.detach()), rtol=1e-10, atol=1e-10)
    for local, full in zip((lq, lk, lv), leaves):
        torch.testing.assert_close(local.grad, mine(full.grad), rtol=1e-10, atol=1e-10)
    dist.barrier()
    return True


def test_ring_attention_matches_full_attention_forward_and_backward():
    for world in (1, 2, 4):
        names = run_distributed(_check_ring, world)
        assert len(names[0]) == 8 and all(n == names[0] for n in names)


def test_ulysses_around_ring_matches_full_attention():
    assert run_distributed(_check_usp, 4) == [True] * 4


@pytest.mark.parametrize("cp", [1, 2, 4])
@pytest.mark.parametrize("balance", [True, False])
def test_shard_and_unshard_are_inverse_and_positions_follow(cp, balance):
    x = torch.arange(3 * 16).reshape(3, 16)
    parts = [shard_sequence(x, 1, cp, r, balance) for r in range(cp)]
    assert torch.equal(unshard_sequence(parts, 1, balance), x)
    for r in range(cp):
        assert torch.equal(x[0, local_positions(16, cp, r, balance)], parts[r][0])
    if balance and cp == 2:  # rank 0 holds chunks 0 and 3 of 4, rank 1 chunks 1 and 2
        assert local_positions(8, 2, 0, True).tolist() == [0, 1, 6, 7]
        assert local_positions(8, 2, 1, True).tolist() == [2, 3, 4, 5]


def test_zigzag_evens_the_causal_work():
    for cp in (2, 4, 8):
        balanced = {block_work(r, cp, True, True) for r in range(cp)}
        contiguous = [block_work(r, cp, True, False) for r in range(cp)]
        assert balanced == {(cp + 1) / 2}  # its diagonal block + cp-1 half blocks
        assert contiguous == [r + 1.0 for r in range(cp)]  # rank r: r past blocks + its diagonal
        assert sum(contiguous) == pytest.approx(cp * (cp + 1) / 2)  # the same total
    with pytest.raises(ValueError, match="2\\*strategy.cp"):
        shard_sequence(torch.zeros(1, 6), 1, 2, 0, True)
