"""Every communication primitive, forward and backward, against the unsharded computation.

Each check builds the same global tensors on every rank (same seed), runs the primitive on this
rank's part, and compares the output and the input gradient with what one process computes on
the whole tensors. Downstream gradients differ per rank where the real use does (a tensor-
parallel region's ranks each contribute a partial gradient).
"""

from __future__ import annotations

import torch

from harness import run_distributed


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _grad_of(fn, x, upstream):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    (y * upstream).sum().backward()
    return y.detach(), x.grad


def _check_all(rank: int, world: int) -> list[str]:
    import torch.distributed as dist

    from tetrad.parallel import comm

    g = dist.group.WORLD
    X = _rand(2, 8, 4, seed=0)                           # [b, s, h]
    Gs = [_rand(2, 8, 4, seed=10 + r) for r in range(world)]  # per-rank upstream gradients
    G = Gs[0]
    chunk = lambda t, d: t.chunk(world, d)[rank]  # noqa: E731
    done = []

    def check(name, got, want):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
        done.append(name)

    # copy: replicated input, each rank's own downstream use -> the sum of their gradients.
    y, gx = _grad_of(lambda x: comm.copy_to_region(x, g), X, Gs[rank])
    check("copy_to_region fwd", y, X)
    check("copy_to_region bwd", gx, sum(Gs))
    # reduce: per-rank partial sums, replicated downstream.
    parts = [_rand(2, 8, 4, seed=20 + r) for r in range(world)]
    y, gx = _grad_of(lambda x: comm.reduce_from_region(x, g), parts[rank], G)
    check("reduce_from_region fwd", y, sum(parts))
    check("reduce_from_region bwd", gx, G)
    # scatter / gather along the last dim.
    y, gx = _grad_of(lambda x: comm.scatter_to_region(x, g), X, chunk(G, -1))
    check("scatter_to_region fwd", y, chunk(X, -1))
    check("scatter_to_region bwd", gx, G)
    y, gx = _grad_of(lambda x: comm.gather_from_region(x, g), chunk(X, -1), G)
    check("gather_from_region fwd", y, X)
    check("gather_from_region bwd", gx, chunk(G, -1))
    # Megatron-SP sequence primitives.
    y, gx = _grad_of(lambda x: comm.scatter_to_sequence(x, g), X, chunk(G, 1))
    check("scatter_to_sequence fwd", y, chunk(X, 1))
    check("scatter_to_sequence bwd", gx, G)
    y, gx = _grad_of(lambda x: comm.gather_from_sequence(x, g), chunk(X, 1), Gs[rank])
    check("gather_from_sequence fwd", y, X)
    check("gather_from_sequence bwd", gx, chunk(sum(Gs), 1))
    y, gx = _grad_of(lambda x: comm.reduce_scatter_to_sequence(x, g), parts[rank], chunk(G, 1))
    check("reduce_scatter_to_sequence fwd", y, chunk(sum(parts), 1))
    check("reduce_scatter_to_sequence bwd", gx, G)
    # Ulysses all-to-all on [b, heads, s, hd]: sequence shard of all heads <-> all of some heads.
    Q, GQ = _rand(2, 2 * world, 4 * world, 3, seed=1), _rand(2, 2 * world, 4 * world, 3, seed=2)
    y, gx = _grad_of(lambda x: comm.all_to_all(x, g, 1, 2), chunk(Q, 2), chunk(GQ, 1))
    check("all_to_all fwd", y, chunk(Q, 1))
    check("all_to_all bwd", gx, chunk(GQ, 2))
    return done


def test_primitives_forward_and_backward_match_unsharded():
    for world in (2, 4):
        names = run_distributed(_check_all, world)
        assert len(names[0]) == 16 and all(n == names[0] for n in names)
