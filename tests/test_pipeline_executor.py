"""The pipeline executor alone (no Engine): every schedule's gradients and loss equal one
process's on the same micro-batches, for pp = 4 and pp = 2, and the pruned stages keep the
plain model's parameter names. One spawned world of 4 ranks runs every case."""

from __future__ import annotations

import pytest
import torch

from harness import run_distributed

CASES = [(4, "gpipe", 1), (4, "1f1b", 1), (4, "interleaved", 2), (4, "zero_bubble", 1),
         (2, "gpipe", 1), (2, "1f1b", 1), (2, "interleaved", 2), (2, "zero_bubble", 1)]
M = 4  # micro-batches


def _model(arch: str = "llama"):
    from tetrad.models import ModelArgs, Transformer

    return Transformer(ModelArgs(arch=arch, vocab_size=64, d_model=32, n_layers=8, n_heads=4,
                                 n_kv_heads=2, seq_len=16), seed=3)


def _data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (M, 2, 16), generator=g)
    return list(ids), list(torch.roll(ids, -1, dims=-1))


def _reference(arch: str):
    from tetrad.models import cross_entropy

    model = _model(arch)
    inputs, labels = _data()
    total = 0.0
    for x, y in zip(inputs, labels):  # gradient accumulation, as the pipeline does
        loss = cross_entropy(model(x), y)
        (loss / M).backward()
        total += float(loss) / M
    return total, {n: p.grad for n, p in model.named_parameters()}


def _rel_err(g: torch.Tensor, ref: torch.Tensor) -> float:
    """max |g - ref| / (|ref| + 1e-3·max|ref|): relative, with a floor for near-zero entries."""
    floor = 1e-3 * float(ref.abs().max()) + 1e-12
    return float(((g - ref).abs() / (ref.abs() + floor)).max())


def _groups(world: int, pp: int):
    import torch.distributed as dist

    groups = [dist.new_group(list(range(s, s + pp))) for s in range(0, world, pp)]
    return groups[dist.get_rank() // pp]


def _run_cases(rank: int, world: int, arch: str) -> list[tuple]:
    import torch.distributed as dist
    from tetrad.models import cross_entropy
    from tetrad.parallel.pipeline import build_pipeline
    from tetrad.parallel.pipeline.p2p import ring_channels

    ref_loss, ref_grads = _reference(arch)
    groups = {pp: _groups(world, pp) for pp in (2, 4)}
    channels = {pp: ring_channels([list(range(s, s + pp)) for s in range(0, world, pp)]) for pp in (2, 4)}
    inputs, labels = _data()
    out = []
    for pp, schedule, v in CASES:
        model = _model(arch)
        ex = build_pipeline(model, groups[pp], schedule=schedule, virtual_stages=v,
                            act_shape=(2, 16, 32), dtype=torch.float32, device=torch.device("cpu"),
                            loss_fn=cross_entropy, instrument=True, channels=channels[pp])
        total = ex.run(inputs, labels, scale=lambda loss: loss / M)
        last = dist.get_rank(groups[pp]) == pp - 1
        grads = {n: p.grad for n, p in model.named_parameters()}
        worst = max(_rel_err(g, ref_grads[n]) for n, g in grads.items())
        assert all(n in ref_grads for n in grads)
        out.append((pp, schedule, sorted(grads), float(total) / M if last else None, worst,
                    ex.stats["peak_in_flight"]))
    out.append(("ref", ref_loss))
    return out


@pytest.mark.parametrize("arch", ["llama"])
def test_every_schedule_matches_one_process(arch):
    results = run_distributed(_run_cases, 4, arch, timeout=180)
    ref_loss = results[0][-1][1]
    for i, (pp, schedule, v) in enumerate(CASES):
        names = set()
        for rank_out in results:
            _, _, rank_names, loss, worst, peak = rank_out[i]
            assert worst < 1e-5, (pp, schedule, worst)
            if loss is not None:
                assert loss == pytest.approx(ref_loss, rel=1e-6), (pp, schedule)
            names |= set(rank_names)
        expected = {n for n, _ in _model(arch).named_parameters()}
        # every parameter is held by exactly one stage of each pp group, under its plain name
        assert names == expected, (pp, schedule, expected ^ names)
        if schedule == "1f1b":
            assert results[0][i][5] <= pp  # stage 0's peak in-flight micro-batches
