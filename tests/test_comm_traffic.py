"""The activation collectives of tp, Megatron-SP, Ulysses sp and cp count the bytes they move.

One spawned world of 4 ranks, as two nodes of two (``ranks_per_node`` 2; the mesh puts tp
innermost, so a tp pair shares a node and a cp or sp pair does not). Each layout builds the
tiny llama's parallel form, runs one forward and backward through the vocab-parallel loss,
and the layout's counter (``tetrad.traffic.Traffic``) must hold exactly what the shapes say
those collectives move, forward and backward, split by node. Volumes as ``tetrad.traffic``
counts them: on a pair, an all-reduce of N bytes sends N to the peer, an all-gather the
shard, a reduce-scatter the chunk, an all-to-all half the buffer, a ring hop the tensor.
"""

from __future__ import annotations

import pytest

from harness import run_distributed

B, S, H, HEADS, KV_HEADS, LAYERS = 2, 32, 32, 4, 2, 2
E = 4  # fp32
LAYOUTS = {
    "tp2": {"tp": 2},
    "tp2_cp2_msp": {"tp": 2, "cp": 2, "megatron_sp": True},
    "tp2_sp2": {"tp": 2, "sp": 2},
}


def _one_step(rank: int, world: int) -> dict:
    import torch

    from tetrad.config import load_strategy
    from tetrad.models import ModelArgs, Transformer
    from tetrad.parallel.layout import ResolvedLayout
    from tetrad.parallel.plan import parallelize
    from tetrad.parallel.tensor import vocab_parallel_cross_entropy

    out = {}
    for name, strategy in LAYOUTS.items():
        torch.manual_seed(0)
        model = Transformer(ModelArgs(arch="llama", d_model=H, n_heads=HEADS, n_kv_heads=KV_HEADS,
                                      seq_len=S, n_layers=LAYERS, dropout=0.0))
        layout = ResolvedLayout.build(load_strategy(strategy), world, torch.device("cpu"), torch.float32,
                                      ranks_per_node=2)
        model = parallelize(model, layout)
        ids = torch.randint(0, model.args.vocab_size, (B, S + 1), generator=torch.Generator().manual_seed(1))
        x, y = layout.shard_tokens(ids[:, :-1]), layout.shard_tokens(ids[:, 1:])
        traffic = layout.nodes.traffic
        traffic.take()
        loss = vocab_parallel_cross_entropy(model(x), y, layout.group("tp"), traffic=traffic)
        loss.backward()
        out[name] = traffic.take()
    return out


def _tp_plain() -> int:
    """Megatron tp, per rank: per layer the two block outputs' all-reduces forward and the two
    region inputs' gradient all-reduces backward (4 x b s h); the embedding's all-reduce
    forward and the head input's gradient all-reduce backward; the loss's two all-reduces
    (the max and [target, sum of exp] per token)."""
    act = B * S * H * E
    return LAYERS * 4 * act + 2 * act + 3 * B * S * E


def _tp_megatron_sp(cp: int) -> int:
    """Megatron-SP over tp=2 inside cp: activations between regions are b (s/cp/2) h. Per layer
    forward: all-gather into attention and MLP, reduce-scatter out of both (4 pieces);
    backward: the reverse of each (4), plus the re-gather of the saved shard by each of the
    five projections that read a gathered input (q, k, v, gate, up), plus the gradient
    all-reduce of both norms' gains (h each). The embedding: reduce-scatter forward, all-gather
    backward; the head: all-gather forward, reduce-scatter and re-gather backward; the final
    norm's gain; the loss's two all-reduces over the b s/cp local tokens."""
    piece = B * (S // cp // 2) * H * E
    return LAYERS * (13 * piece + 2 * H * E) + 2 * piece + 3 * piece + H * E + 3 * B * (S // cp) * E


def _ring(cp: int) -> int:
    """Ring attention over cp, per rank and layer: K and V of its s/cp tokens (the kv heads of
    this tp rank, sent once per kv head), one hop forward per other rank; backward the same
    hops plus cp hops of their fp32 gradient accumulator."""
    kv = 2 * B * (KV_HEADS // 2) * (S // cp) * (H // HEADS) * E
    return LAYERS * ((cp - 1) * kv + (cp - 1) * kv + cp * kv)


def _ulysses(sp: int) -> int:
    """Ulysses over sp=2 (tp=2 inside): per layer q, k, v and the output each all-to-all forward
    and backward, sending 1/sp of [b, heads/tp, s/sp, hd] (k, v repeated to every query head
    before the core); and tp's own Megatron volume on the b (s/sp) h activations."""
    per_tensor = B * (HEADS // 2) * (S // sp) * (H // HEADS) * E
    a2a = LAYERS * 2 * 4 * per_tensor // sp
    act = B * (S // sp) * H * E
    return a2a, LAYERS * 4 * act + 2 * act + 3 * B * (S // sp) * E


@pytest.mark.slow  # ~20 s: one spawned world of 4, three layouts
def test_activation_collectives_count_what_the_shapes_say():
    got = run_distributed(_one_step, 4, timeout=300)
    a2a, tp_in_sp = _ulysses(2)
    want = {"tp2": {"intra": _tp_plain(), "inter": 0},
            "tp2_cp2_msp": {"intra": _tp_megatron_sp(2), "inter": _ring(2)},
            "tp2_sp2": {"intra": tp_in_sp, "inter": a2a}}
    for rank, counts in enumerate(got):
        for name in LAYOUTS:
            assert counts[name] == want[name], (rank, name, counts[name], want[name])
