"""Pipeline pieces that need no processes: schedules on a cost model, stage split, and the
backward split of zero-bubble schedules."""

from __future__ import annotations

import pytest
import torch

from tetrad.parallel.pipeline import (balanced_partition, build_schedule, bubble, even_partition,
                                      simulate, split_model, theoretical_bubble)
from tetrad.parallel.pipeline.zero_bubble import WeightGradStore

LAYOUTS = [(2, 2), (2, 4), (4, 4), (4, 8), (4, 12), (3, 6)]


@pytest.mark.parametrize("p,m", LAYOUTS)
@pytest.mark.parametrize("name,v", [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("interleaved", 3),
                                    ("zero_bubble", 1)])
def test_schedule_is_complete_and_deadlock_free(name, v, p, m):
    if name == "interleaved" and m % p:
        pytest.skip("interleaved needs m % p == 0 (rejection tested below)")
    sched = build_schedule(name, p, m, v)
    for r, acts in enumerate(sched):
        kinds = ("F", "B", "W") if name == "zero_bubble" else ("F", "B")
        assert sorted(acts) == sorted((k, j, c) for k in kinds for j in range(m) for c in range(v))
    timeline = simulate(sched, (1.0, 1.0, 1.0))  # raises on deadlock
    measured = sum(bubble(timeline)) / p
    theory = theoretical_bubble(name, p, m, v, (1.0, 1.0, 1.0))
    if name != "zero_bubble" or m >= 2 * p:  # ZB-H1's formula assumes a long enough steady state
        assert measured == pytest.approx(theory, abs=1e-9)


def test_bubble_ordering_on_cost_model():
    costs = (1.0, 1.0, 1.0)
    b = {n: sum(bubble(simulate(build_schedule(n, 4, 8, v), costs))) / 4
         for n, v in [("1f1b", 1), ("interleaved", 2), ("zero_bubble", 1)]}
    assert b["interleaved"] < b["1f1b"] and b["zero_bubble"] < b["1f1b"]


def test_one_f_one_b_in_flight_at_most_p():
    for p, m in LAYOUTS:
        for r, acts in enumerate(build_schedule("1f1b", p, m)):
            live = peak = 0
            for a in acts:
                live += 1 if a.kind == "F" else -1
                peak = max(peak, live)
            assert peak <= p - r


def test_bad_micro_batch_counts_and_names_are_rejected():
    with pytest.raises(ValueError, match="multiple of strategy.pp=4"):
        build_schedule("interleaved", 4, 6, 2)
    with pytest.raises(ValueError, match="pipeline_schedule"):
        build_schedule("zb-v", 4, 8)
    with pytest.raises(ValueError, match="virtual_stages=2"):
        build_schedule("1f1b", 4, 8, 2)
    with pytest.raises(ValueError, match="at least one layer"):
        even_partition(3, 4)


def test_partitions():
    assert [len(r) for r in even_partition(10, 4)] == [3, 3, 2, 2]
    # a heavy head pushes layers away from the last chunk; a heavy embedding from the first
    assert [len(r) for r in balanced_partition([1.0] * 8, 4, head_cost=2.0)] in ([3, 2, 2, 1], [2, 3, 2, 1], [2, 2, 3, 1])
    assert [len(r) for r in balanced_partition([1.0] * 8, 4, embed_cost=2.0)][0] == 1
    assert [len(r) for r in balanced_partition([1.0, 1.0, 4.0, 1.0, 1.0, 1.0], 3)] == [2, 1, 3]


def _tiny(n_layers: int = 4):
    from tetrad.models import ModelArgs, Transformer

    return Transformer(ModelArgs(arch="gpt", vocab_size=32, d_model=16, n_layers=n_layers,
                                 n_heads=2, seq_len=8), seed=1)


def test_split_keeps_plain_names_and_only_owned_layers():
    model = _tiny(8)
    names = {n for n, _ in model.named_parameters()}
    chunks = split_model(model, rank=1, p=2, v=2)  # global chunks 1 and 3 of 4: layers 2-3, 6-7
    held = {n for n, _ in model.named_parameters()}
    assert held <= names
    assert {n.split(".")[1] for n in held if n.startswith("layers.")} == {"2", "3", "6", "7"}
    assert any(n.startswith("lm_head") for n in held) and not any(n.startswith("tok_emb") for n in held)
    assert [c.index for c in chunks] == [1, 3] and chunks[1].is_last and not chunks[0].is_first


def test_weight_gradients_are_deferred_to_w_and_exact():
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = _tiny()
    ref(ids).square().mean().backward()
    model, store = _tiny(), WeightGradStore()
    with store.capture():
        out = model(ids).square().mean()
    with store.backward_of("mb0"):
        out.backward()
    assert model.layers[0].attn.q_proj.weight.grad is None  # W not run yet
    assert model.layers[0].attn_norm.weight.grad is not None  # non-Linear weights: in B
    store.run("mb0")
    assert not store.pending()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


@pytest.mark.parametrize("policy,deferred", [("full", 1), ("selective", 4 * 6 + 1), ("none", 4 * 6 + 1)])
def test_weight_split_composes_with_recompute(policy, deferred):
    """Recomputed blocks keep plain Linears (autograd drops function modes in backward), the rest
    are split; gradients stay exact either way."""
    from tetrad.recompute import apply_recompute
    from tetrad.parallel.pipeline.zero_bubble import exclude_recomputed

    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = _tiny()
    ref(ids).square().mean().backward()
    model, store = apply_recompute(_tiny(), policy), WeightGradStore()
    exclude_recomputed(store, model.layers)
    for _ in range(2):  # twice: an early-stopped recompute must not leave splitting paused
        model.zero_grad(set_to_none=True)
        with store.capture():
            out = model(ids).square().mean()
        with store.backward_of("mb0"):
            torch.autograd.backward(out)
        assert len(store.work["mb0"]) == deferred
        store.run("mb0")
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


# ------------------------------------------------------------------ ZB-V, breadth-first, placement
from tetrad.parallel.pipeline import placement  # noqa: E402


@pytest.mark.parametrize("p,m", LAYOUTS)
def test_zbv_and_breadth_first_are_complete_and_deadlock_free(p, m):
    for name, v, kinds in (("zero_bubble_v", 2, "FBW"), ("breadth_first", 2, "FB"), ("breadth_first", 3, "FB")):
        sched = build_schedule(name, p, m, 1 if name == "zero_bubble_v" else v)
        for acts in sched:
            assert sorted(acts) == sorted((k, j, c) for k in kinds for j in range(m) for c in range(v))
        place = placement(name, p, 1 if name == "zero_bubble_v" else v)
        timeline = simulate(sched, (1.0, 1.0, 1.0), placement=place)  # raises on deadlock
        measured = sum(bubble(timeline)) / p
        if name == "breadth_first" and m >= p:
            assert measured == pytest.approx(theoretical_bubble(name, p, m, v, (1.0, 1.0, 1.0)), abs=1e-9)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 16), (8, 16)])
def test_zbv_halves_zb_h1_bubble_at_1f1b_memory(p, m):
    """ZB-V on the cost model (T_F = T_B = T_W per chunk): idle (p-1)(T_F+T_B-T_W)/2 in stage
    units, half of ZB-H1's (the cost model's ZB-V term), and never more than 2p half-stage
    chunks in flight on any rank (1F1B's first-stage memory, on every rank)."""
    zbv = build_schedule("zero_bubble_v", p, m)
    b = sum(bubble(simulate(zbv, (1.0, 1.0, 1.0), placement=placement("zero_bubble_v", p)))) / p
    work = 3 * m  # stage units per rank: 2 chunks x m x (F + B + W) of half a stage
    idle = (p - 1) * (1 + 1 - 1) / 2
    assert b == pytest.approx(idle / (idle + work), abs=0.01)
    assert b < sum(bubble(simulate(build_schedule("zero_bubble", p, m), (2.0, 2.0, 2.0)))) / p
    for acts in zbv:
        live = peak = 0
        for a in acts:
            live += {"F": 1, "B": -1, "W": 0}[a.kind]
            peak = max(peak, live)
        assert peak <= 2 * p


def test_v_placement_round_trips_and_puts_both_ends_on_rank_0():
    for shape, v in (("v", 2), ("loop", 3)):
        place = placement("zero_bubble_v" if shape == "v" else "interleaved", 4, v)
        for c in range(place.n_chunks):
            assert place.global_of(place.rank_of(c), place.local_of(c)) == c
    v = placement("zero_bubble_v", 4)
    assert [v.rank_of(c) for c in range(8)] == [0, 1, 2, 3, 3, 2, 1, 0]
    model = _tiny(8)
    chunks = split_model(model, rank=0, p=4, v=2, placement=v)
    assert [c.index for c in chunks] == [0, 7] and chunks[0].is_first and chunks[1].is_last
    held = {n.split(".")[1] for n, _ in model.named_parameters() if n.startswith("layers.")}
    assert held == {"0", "7"} and model.tok_emb is not None and model.lm_head is not None


def test_balanced_split_counts_the_head_and_pp_split_is_explicit():
    from tetrad.models import ModelArgs, Transformer
    from tetrad.parallel.pipeline import modelled_costs, partition

    with torch.device("meta"):  # shapes only: a 32k vocabulary makes the head ~ 4 blocks
        big_vocab = Transformer(ModelArgs(arch="llama", vocab_size=32768, d_model=64, n_layers=8, n_heads=4,
                                          seq_len=64))
    layers, embed, head = modelled_costs(big_vocab, 64)
    assert head > 3 * layers[0] and embed < layers[0]
    sizes = [len(r) for r in partition(big_vocab, 4, 64)]
    assert sum(sizes) == 8 and sizes[-1] < sizes[0]  # the last chunk gives layers away for the head
    assert [list(r) for r in partition(big_vocab, 4, 64, (1, 5, 7))] == [[0], [1, 2, 3, 4], [5, 6], [7]]
    with pytest.raises(ValueError, match="pp_split"):
        partition(big_vocab, 4, 64, (1, 5))


def test_tied_split_keeps_the_embedding_on_the_last_stage_as_a_replica():
    from tetrad.models import ModelArgs, Transformer
    from tetrad.parallel.pipeline import stage_replicas, stage_ties

    args = ModelArgs(arch="gpt", vocab_size=32, d_model=16, n_layers=4, n_heads=2, seq_len=8, tie_embeddings=True)
    whole = Transformer(args, seed=1)
    first, last = Transformer(args, seed=1), Transformer(args, seed=1)
    split_model(first, rank=0, p=2)
    split_model(last, rank=1, p=2)
    assert stage_ties(first) == stage_ties(last) == ["tok_emb.weight"]
    assert stage_replicas(first) == [] and stage_replicas(last) == ["tok_emb.weight"]
    assert last.pos_emb is None and last.lm_head.weight is last.tok_emb.weight
    torch.testing.assert_close(last.tok_emb.weight, whole.lm_head.weight)
    v = Transformer(args, seed=1)
    split_model(v, rank=0, p=2, v=2, placement=placement("zero_bubble_v", 2))
    assert stage_ties(v) == [] and not v.pipeline_tied  # both ends on rank 0: nothing to sum


def test_hugging_face_models_split_from_their_plan_or_names():
    pytest.importorskip("transformers")
    from tetrad.models.hf import build_hf

    llama = build_hf({"arch": "hf", "hf_model_type": "llama", "d_model": 32, "n_layers": 4, "n_heads": 4,
                      "n_kv_heads": 2, "seq_len": 16, "vocab_size": 64})
    chunks = split_model(llama, rank=1, p=2)
    names = {n for n, _ in llama.named_parameters()}
    assert "hf.model.layers.2.self_attn.q_proj.weight" in names and "hf.lm_head.weight" in names
    assert not any(n.startswith("hf.model.layers.0.") or "embed_tokens" in n for n in names)
    assert llama.hf.model.rotary_emb is not None and chunks[0].is_last
    gpt2 = build_hf({"arch": "hf", "hf_model_type": "gpt2", "d_model": 32, "n_layers": 4, "n_heads": 4,
                     "seq_len": 16, "vocab_size": 64})
    split_model(gpt2, rank=0, p=2)
    names = {n for n, _ in gpt2.named_parameters()}
    assert "hf.transformer.wpe.weight" in names and "hf.transformer.h.1.attn.c_attn.weight" in names
    assert not any(n.startswith(("hf.transformer.h.2.", "hf.transformer.ln_f", "hf.lm_head")) for n in names)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_hf_stages_attend_with_the_models_own_sliding_windows(family):
    """Two pipeline stages of a sliding-window model (Qwen2: sliding on the upper blocks by
    ``layer_types``; Mistral: on every block) give the whole model's logits; a full causal
    mask would not (the window matters at this length)."""
    transformers = pytest.importorskip("transformers")
    import copy

    extra = {"qwen2": dict(use_sliding_window=True, sliding_window=4, max_window_layers=2),
             "mistral": dict(sliding_window=4)}[family]
    unwindowed = {"qwen2": {}, "mistral": dict(sliding_window=None)}[family]

    def build(**kw):
        cfg = transformers.AutoConfig.for_model(family, vocab_size=64, hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=4, num_attention_heads=4,
                                                num_key_value_heads=2, max_position_embeddings=64, **kw)
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(cfg).eval()

    whole = build(**extra)
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        want = whole(input_ids=x, use_cache=False).logits
        stages = [copy.deepcopy(whole) for _ in range(2)]
        chunks = [split_model(stages[r], rank=r, p=2)[0] for r in range(2)]
        assert {chunks[0].view.attention_kind(b) for b in whole.model.layers} == (
            {"full_attention", "sliding_attention"} if family == "qwen2" else {"sliding_attention"})
        torch.testing.assert_close(chunks[1](chunks[0](x)), want)
        full = build(**unwindowed)
        full.load_state_dict(whole.state_dict())
        assert not torch.allclose(full(input_ids=x, use_cache=False).logits, want, atol=1e-4)


def test_measured_costs_time_every_layer_the_embedding_and_the_head():
    from tetrad.parallel.pipeline import measure_costs

    model = _tiny(3)
    layers, embed, head = measure_costs(model, torch.randint(0, 32, (2, 8)), reps=2)
    assert len(layers) == 3 and all(t > 0 for t in layers) and embed > 0 and head > 0


def test_breadth_first_alone_holds_chunks_over_runs_of_passes():
    """``held_spans``: breadth-first's runs (each chunk's m forwards, then its m backwards; the
    last chunk's two runs are one) are held; schedules that alternate chunks or micro-batches
    pass by pass, or have one chunk per rank, or defer W passes, are not."""
    from tetrad.parallel.pipeline.actions import held_spans

    p, m = 2, 4
    for acts in build_schedule("breadth_first", p, m, 2):
        spans = held_spans(acts)
        assert [(r.start, r.stop) for r in spans] == [(0, m), (m, 3 * m), (3 * m, 4 * m)]
        assert [{acts[i].chunk for i in r} for r in spans] == [{0}, {1}, {0}]
    for acts in build_schedule("breadth_first", 4, 8, 3):  # v = 3: chunk 0 and 1 twice, chunk 2 once
        assert [acts[r.start].chunk for r in held_spans(acts)] == [0, 1, 2, 1, 0]
    for name, v in [("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zero_bubble", 1), ("zero_bubble_v", 1)]:
        assert all(held_spans(acts) is None for acts in build_schedule(name, p, m, v)), name


def test_chunk_parameters_are_its_layers_and_its_ends():
    model = _tiny(8)
    first, later = split_model(model, rank=0, p=2, v=2)  # global chunks 0 (embedding) and 2
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].split(".")[0] for p in first.parameters()} == {"tok_emb", "pos_emb", "layers"}
    assert {names[id(p)].split(".")[1] for p in later.parameters()} == {"4", "5"}
    last = split_model(_tiny(8), rank=1, p=2, v=2)[1]
    assert {n.split(".")[0] for n, p in last.model.named_parameters()
            if any(p is q for q in last.parameters())} == {"layers", "norm", "lm_head"}
