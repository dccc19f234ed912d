"""Reference models: shapes, causality, deterministic init, loss, HF adapters and parity."""

import math
from types import SimpleNamespace

import pytest
import torch

from tetrad.models import (CoreAttention, HFCausalLM, ModelArgs, Transformer, build_model,
                           cross_entropy, flops_per_token, num_params)

V, S, B = 97, 16, 2


def make_args(arch, **kw):
    base = dict(arch=arch, vocab_size=V, d_model=32, n_layers=2, n_heads=4, seq_len=S)
    if arch == "llama":
        base["n_kv_heads"] = 2
    base.update(kw)
    return ModelArgs(**base)


def ids(seed=0, b=B, s=S):
    return torch.randint(0, V, (b, s), generator=torch.Generator().manual_seed(seed))


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_forward_shape_and_split(arch):
    model = Transformer(make_args(arch))
    x = ids()
    logits = model(x)
    assert logits.shape == (B, S, V)
    h = model.embed(x)
    for layer in model.layers:
        h = layer(h)
    torch.testing.assert_close(model.head(h), logits, rtol=0, atol=0)


def test_defaults_and_validation():
    assert ModelArgs(arch="gpt", d_model=64).d_ff == 256
    assert ModelArgs(arch="llama", d_model=64).d_ff == 176  # 170 rounded up to 8
    assert ModelArgs(n_heads=4).n_kv_heads == 4
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelArgs(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="arch"):
        ModelArgs(arch="bert")
    cfg = SimpleNamespace(arch="hf", hf_model_type="gpt2", vocab_size=50, d_model=32,
                          n_layers=1, n_heads=2, n_kv_heads=None, seq_len=8, dropout=0.1,
                          extra_key="ignored")
    args = ModelArgs.from_config(cfg)
    assert (args.arch, args.vocab_size, args.dropout, args.n_kv_heads) == ("gpt", 50, 0.1, 2)
    assert ModelArgs.from_config({"arch": "llama", "d_model": 64}).d_model == 64


def test_module_names():
    names = dict(Transformer(make_args("llama")).named_modules())
    params = dict(Transformer(make_args("llama")).named_parameters())
    for n in ["layers.0.attn.q_proj.weight", "layers.0.attn.k_proj.weight",
              "layers.0.attn.v_proj.weight", "layers.0.attn.o_proj.weight",
              "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight",
              "layers.1.mlp.down_proj.weight", "layers.0.attn_norm.weight",
              "layers.0.mlp_norm.weight", "norm.weight", "tok_emb.weight", "lm_head.weight"]:
        assert n in params, n
    assert isinstance(names["layers.0.attn.core"], CoreAttention)
    assert "layers.0.attn.q_proj.bias" not in params and "pos_emb" not in names
    assert params["layers.0.attn.k_proj.weight"].shape == (2 * 8, 32)  # GQA: 2 kv heads of 8
    gpt = dict(Transformer(make_args("gpt")).named_parameters())
    for n in ["pos_emb.weight", "layers.0.attn.q_proj.bias", "layers.0.mlp.fc_in.weight",
              "layers.0.mlp.fc_out.bias", "layers.0.attn_norm.bias", "norm.bias"]:
        assert n in gpt, n


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_causal(arch):
    model = Transformer(make_args(arch)).eval()
    x = ids()
    y = x.clone()
    t = 9
    y[:, t] = (y[:, t] + 1) % V
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)
    assert not torch.allclose(a[:, t:], b[:, t:])


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_init_deterministic_and_private(arch):
    args = make_args(arch)
    state = torch.get_rng_state()
    a = Transformer(args, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert same_weights(a, Transformer(args, seed=3))
    assert not same_weights(a, Transformer(args, seed=4))
    sd = a.state_dict()
    std = 0.02 / math.sqrt(2 * args.n_layers)
    assert abs(sd["layers.0.attn.o_proj.weight"].std().item() - std) < 0.3 * std
    assert abs(sd["tok_emb.weight"].std().item() - 0.02) < 0.003
    assert torch.all(sd["norm.weight"] == 1)


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("tie", [False, True])
def test_meta_build_matches_direct(arch, tie):
    args = make_args(arch, tie_embeddings=tie)
    with torch.device("meta"):
        m = Transformer(args)
    assert m.tok_emb.weight.is_meta
    m.to_empty(device="cpu")
    m.init_weights(7)
    ref = Transformer(args, seed=7)
    assert same_weights(m, ref)
    assert (m.lm_head.weight is m.tok_emb.weight) == tie
    x = ids()
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)  # RoPE tables rebuilt too


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_init_is_per_parameter_name(arch):
    """Each parameter's values depend only on (seed, its name, shape): a model that keeps some
    of its layers under their names (a pipeline stage) initialises them exactly as the whole
    model does, whatever else exists and in whatever order they are visited."""
    from tetrad.models import init_parameter

    args = make_args(arch, n_layers=4)
    whole = dict(Transformer(args, seed=5).named_parameters())
    with torch.device("meta"):
        part = Transformer(args, seed=5)
    part.layers = torch.nn.ModuleDict({"2": part.layers[2], "3": part.layers[3]})  # keep names
    part.tok_emb = None
    part.materialize("cpu")
    held = dict(part.named_parameters())
    assert held and not any(n.startswith(("tok_emb", "layers.0", "layers.1")) for n in held)
    for n, p in held.items():
        assert torch.equal(p, whole[n]), n
    for n in reversed(list(whole)):  # any order, one parameter at a time
        p = torch.empty_like(whole[n])
        init_parameter(n, p, 5, args.n_layers)
        assert torch.equal(p, whole[n]), n
    # same shape, different names (and seeds): different draws
    q0, q1 = whole["layers.0.attn.q_proj.weight"], whole["layers.1.attn.q_proj.weight"]
    assert not torch.equal(q0, q1)
    assert not torch.equal(q0, Transformer(args, seed=6).layers[0].attn.q_proj.weight)


def test_tied_embeddings_share_storage():
    m = Transformer(make_args("gpt", tie_embeddings=True))
    assert m.lm_head.weight is m.tok_emb.weight
    assert m.lm_head.weight.data_ptr() == m.tok_emb.weight.data_ptr()
    untied = Transformer(make_args("gpt"))
    assert num_params(untied) - num_params(m) == V * 32


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_loss_at_init_and_training(arch):
    torch.manual_seed(0)
    model = Transformer(make_args(arch))
    x = ids(b=4)
    labels = torch.roll(x, -1, dims=1)
    labels[:, -1] = -100
    loss0 = cross_entropy(model(x), labels)
    assert abs(loss0.item() - math.log(V)) < 0.3
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(8):
        loss = cross_entropy(model(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert cross_entropy(model(x), labels).item() < loss0.item() - 0.5


def test_cross_entropy_ignore_and_upcast():
    logits = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    labels = torch.tensor([[1, -100, 2], [0, 4, -100]])
    ref = torch.nn.functional.cross_entropy(logits.float()[labels != -100], labels[labels != -100])
    out = cross_entropy(logits, labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_rope_positions_select_slice():
    model = Transformer(make_args("llama")).eval()
    attn = model.layers[0].attn
    x = torch.randn(2, 4, 12, 8)
    full = attn.rope(x)
    torch.testing.assert_close(attn.rope(x[:, :, 4:8], torch.arange(4, 8)), full[:, :, 4:8])
    per_sample = torch.arange(4, 8).expand(2, 4)
    torch.testing.assert_close(attn.rope(x[:, :, 4:8], per_sample), full[:, :, 4:8])


def test_flops_and_params_match_papers():
    a = ModelArgs(arch="gpt", vocab_size=1000, d_model=64, n_layers=3, n_heads=4, seq_len=32)
    L, h, s = 3, 64, 32
    paper = 72 * L * h * h * (1 + s / (6 * h) + 1000 / (12 * h * L))
    assert flops_per_token(a) == pytest.approx(paper)
    # Megatron P = 12 L h^2 (1 + 13/(12h) + (V + s)/(12 L h)) counts the head once (as tied)
    # and leaves out the final LayerNorm's 2h.
    m = Transformer(ModelArgs(arch="gpt", vocab_size=1000, d_model=64, n_layers=3, n_heads=4,
                              seq_len=32, tie_embeddings=True))
    assert num_params(m) == round(12 * L * h * h * (1 + 13 / (12 * h) + (1000 + s) / (12 * L * h))) + 2 * h


# ---- Hugging Face adapters and parity ---------------------------------------------------

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("hf_type", ["llama", "gpt2"])
def test_hf_adapter(hf_type):
    cfg = SimpleNamespace(arch="hf", hf_model_type=hf_type, vocab_size=V, d_model=32,
                          n_layers=2, n_heads=4, n_kv_heads=2 if hf_type == "llama" else None,
                          d_ff=None, seq_len=S, dropout=0.0, norm_eps=1e-5, rope_theta=10000.0,
                          tie_embeddings=False)
    state = torch.get_rng_state()
    model = build_model(cfg, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(model, HFCausalLM) and isinstance(model.hf, torch.nn.Module)
    assert model(ids()).shape == (B, S, V)
    assert same_weights(model, build_model(cfg, seed=1))


def test_build_model_native():
    cfg = SimpleNamespace(arch="llama", vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                          n_kv_heads=2, seq_len=S, hf_model_type=None)
    assert same_weights(build_model(cfg, seed=2), Transformer(make_args("llama"), seed=2))


def test_llama_matches_hf():
    args = make_args("llama", rope_theta=500.0, norm_eps=1e-6)
    ours = Transformer(args, seed=0).eval()
    cfg = SimpleNamespace(**{**vars(args), "arch": "hf", "hf_model_type": "llama"})
    hf = build_model(cfg).hf.eval()
    sd = {"model.embed_tokens.weight": ours.tok_emb.weight, "model.norm.weight": ours.norm.weight,
          "lm_head.weight": ours.lm_head.weight}
    for i in range(args.n_layers):
        p, q = f"layers.{i}.", f"model.layers.{i}."
        for a, b in [("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")]:
            sd[q + b + ".weight"] = ours.state_dict()[p + a + ".weight"]
        for n in ["q_proj", "k_proj", "v_proj", "o_proj"]:
            sd[q + "self_attn." + n + ".weight"] = ours.state_dict()[p + "attn." + n + ".weight"]
        for n in ["gate_proj", "up_proj", "down_proj"]:
            sd[q + "mlp." + n + ".weight"] = ours.state_dict()[p + "mlp." + n + ".weight"]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_gpt_matches_hf_gpt2():
    args = make_args("gpt")
    ours = Transformer(args, seed=0).eval()
    cfg = SimpleNamespace(**{**vars(args), "arch": "hf", "hf_model_type": "gpt2"})
    hf = build_model(cfg).hf.eval()
    o = ours.state_dict()
    sd = {"transformer.wte.weight": o["tok_emb.weight"], "transformer.wpe.weight": o["pos_emb.weight"],
          "transformer.ln_f.weight": o["norm.weight"], "transformer.ln_f.bias": o["norm.bias"],
          "lm_head.weight": o["lm_head.weight"]}
    for i in range(args.n_layers):
        p, q = f"layers.{i}.", f"transformer.h.{i}."
        for a, b in [("attn_norm", "ln_1"), ("mlp_norm", "ln_2")]:
            sd[q + b + ".weight"], sd[q + b + ".bias"] = o[p + a + ".weight"], o[p + a + ".bias"]
        # GPT-2's Conv1D stores [in, out]; fused c_attn is q|k|v along out.
        qkv = [p + f"attn.{n}_proj" for n in "qkv"]
        sd[q + "attn.c_attn.weight"] = torch.cat([o[n + ".weight"] for n in qkv]).t()
        sd[q + "attn.c_attn.bias"] = torch.cat([o[n + ".bias"] for n in qkv])
        for a, b in [("attn.o_proj", "attn.c_proj"), ("mlp.fc_in", "mlp.c_fc"), ("mlp.fc_out", "mlp.c_proj")]:
            sd[q + b + ".weight"], sd[q + b + ".bias"] = o[p + a + ".weight"].t(), o[p + a + ".bias"]
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("attn.bias" in k or "masked_bias" in k for k in missing), missing
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(input_ids=x).logits, rtol=1e-5, atol=1e-5)


def test_attention_heads_follow_projection_shapes():
    """Tensor parallelism gives each rank a slice of heads: attention must read the head
    counts (and the GQA repeat) from the tensors, so the ranks' partial outputs sum to the whole."""
    args = make_args("llama", n_heads=4, n_kv_heads=2)
    model = Transformer(args, seed=1).eval()
    attn = model.layers[0].attn
    x = torch.randn(2, S, 32)
    full = attn(x)
    hd, parts = attn.head_dim, []
    for r in range(2):  # 2 "ranks": q heads [2r, 2r+1], kv head r
        shard = Transformer(args, seed=1).eval().layers[0].attn
        q, kv = slice(2 * r * hd, (2 * r + 2) * hd), slice(r * hd, (r + 1) * hd)
        shard.q_proj = torch.nn.Linear(32, 2 * hd, bias=False)
        shard.q_proj.weight.data = attn.q_proj.weight[q]
        shard.k_proj = torch.nn.Linear(32, hd, bias=False)
        shard.k_proj.weight.data = attn.k_proj.weight[kv]
        shard.v_proj = torch.nn.Linear(32, hd, bias=False)
        shard.v_proj.weight.data = attn.v_proj.weight[kv]
        shard.o_proj = torch.nn.Linear(2 * hd, 32, bias=False)
        shard.o_proj.weight.data = attn.o_proj.weight[:, q]
        parts.append(shard(x))
    torch.testing.assert_close(parts[0] + parts[1], full, rtol=1e-5, atol=1e-6)


def test_dropout_train_mode_runs():
    model = Transformer(make_args("llama", dropout=0.5)).train()
    x = ids()
    a, b = model(x), model(x)
    assert a.shape == (B, S, V) and not torch.equal(a, b)
    model.eval()
    torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
