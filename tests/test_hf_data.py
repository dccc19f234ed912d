"""Raw data sources, Hugging Face tokenizers, packing, SFT masks, and every bad input's error.

Single process. The tokenizer is a byte-level BPE trained here (tests/hf_families.py), saved
with save_pretrained; jsonl, parquet and saved datasets are written by ``datasets`` itself.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from hf_families import corpus, make_checkpoint, make_tokenizer
from tetrad.config import ConfigError, load_config
from tetrad.data import (DataError, TokenDataset, build_dataset, data_main, load_tokenizer, open_tokens, pack,
                         read_token_header)

pytest.importorskip("datasets")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(str(make_tokenizer(tmp_path_factory.mktemp("tok"))))


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _unpack(path):
    return np.asarray(open_tokens(path), dtype=np.int64)


# ------------------------------------------------------------------ packing
def test_documents_packed_with_eos_and_same_for_any_worker_count(tok, tmp_path):
    docs = corpus(60)
    src = _jsonl(tmp_path / "d.jsonl", [{"body": d} for d in docs])
    one, two = tmp_path / "one.tokens", tmp_path / "two.tokens"
    n = pack(f"jsonl:{src}", tok, one, text_field="body", workers=1)
    assert pack(f"jsonl:{src}", tok, two, text_field="body", workers=2) == n
    assert one.read_bytes() == two.read_bytes()  # two tokenizer processes, identical output
    ids = _unpack(one)
    want = np.concatenate([np.r_[tok.encode(d), tok.eos_id] for d in docs])
    np.testing.assert_array_equal(ids, want)
    assert read_token_header(one).vocab_size == tok.vocab_size == 301


def test_jsonl_file_dir_glob_parquet_and_saved_dataset_agree(tok, tmp_path):
    import datasets

    docs = corpus(40)
    (tmp_path / "dir").mkdir()
    _jsonl(tmp_path / "dir" / "a.jsonl", [{"text": d} for d in docs[:25]])
    _jsonl(tmp_path / "dir" / "b.jsonl", [{"text": d} for d in docs[25:]])
    datasets.Dataset.from_dict({"text": docs[:25]}).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_dict({"text": docs[25:]}).to_parquet(str(tmp_path / "b.parquet"))
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    sources = [f"jsonl:{tmp_path / 'dir'}", f"jsonl:{tmp_path}/dir/*.jsonl", f"parquet:{tmp_path}/*.parquet",
               f"hf:{tmp_path / 'saved'}"]
    outs = []
    for i, src in enumerate(sources):
        pack(src, tok, tmp_path / f"{i}.tokens")
        outs.append(_unpack(tmp_path / f"{i}.tokens"))
    for got, src in zip(outs[1:], sources[1:]):
        np.testing.assert_array_equal(got, outs[0], err_msg=src)
    assert (outs[0] == tok.eos_id).sum() == len(docs)


def test_sft_prompt_tokens_are_masked(tok, tmp_path):
    records = [{"prompt": f"question {i}: ", "completion": f"the answer is {i}."} for i in range(12)]
    out = tmp_path / "sft.tokens"
    pack(f"jsonl:{_jsonl(tmp_path / 's.jsonl', records)}", tok, out, fmt="sft")
    ds = TokenDataset(open_tokens(out), 8, open_tokens(out.with_name(out.name + ".mask")))
    ids = _unpack(out)
    target = np.zeros(len(ids), dtype=bool)  # which tokens the loss may predict
    pos = 0
    for r in records:
        p, c = tok.encode(r["prompt"]), tok.encode(r["completion"])
        pos += len(p)
        target[pos:pos + len(c) + 1] = True  # the completion and its EOS
        pos += len(c) + 1
    assert pos == len(ids)
    x, y = ds.get_batch(range(len(ds)))
    flat_next = ids[1:len(ds) * 8 + 1]
    np.testing.assert_array_equal((y.reshape(-1) != -100).numpy(), target[1:len(ds) * 8 + 1])
    np.testing.assert_array_equal(y.reshape(-1)[y.reshape(-1) != -100].numpy(), flat_next[target[1:len(ds) * 8 + 1]])


def test_sft_messages_train_on_assistant_turns_only(tok, tmp_path):
    conv = [{"role": "user", "content": "name a bird"}, {"role": "assistant", "content": "the bird"},
            {"role": "user", "content": "and a dog"}, {"role": "assistant", "content": "the dog"}]
    ids, mask = tok.chat(conv)
    text = tok.tok.decode([i for i, m in zip(ids, mask) if m])
    assert text == "the bird<|endoftext|>the dog<|endoftext|>"
    out = tmp_path / "chat.tokens"
    pack(f"jsonl:{_jsonl(tmp_path / 'c.jsonl', [{'messages': conv}] * 3)}", tok, out, fmt="sft")
    assert _unpack(out).tolist() == ids * 3  # the template ended with EOS: none added


def test_text_source_with_a_tokenizer_is_one_document(tok, tmp_path):
    text = "\n".join(corpus(30)) + "\n"
    (tmp_path / "t.txt").write_text(text)
    pack(f"text:{tmp_path / 't.txt'}", tok, tmp_path / "t.tokens")
    ids = _unpack(tmp_path / "t.tokens")
    assert ids[-1] == tok.eos_id and (ids == tok.eos_id).sum() == 1
    assert tok.tok.decode(ids[:-1]) == text


def test_prepare_cli_with_a_tokenizer(tok, tmp_path, capsys):
    src = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in corpus(20)])
    out = tmp_path / "p.tokens"
    assert data_main(["prepare", f"jsonl:{src}", str(out), "--tokenizer", tok.name, "--workers", "2"]) == 0
    assert f"tokens written to {out}" in capsys.readouterr().out
    ds = build_dataset(f"tokens:{out}", 8, 0, 1000, vocab_size=301)
    assert len(ds) > 10


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("content, message", [
    ('{"text": "a"}\n{"text": "b"}\nnot json\n', "line 3 is not JSON"),
    ('{"text": "a"}\n[1, 2]\n', "line 2 is list, not a JSON object"),
    ('{"body": "a"}\n', "no column 'text' (columns: body)"),
    ('{"text": "a"}\n{"other": "b"}\n', "row 1 has no value in column 'text'"),
    ("", "empty file"),
    ("\n\n", "empty dataset (no records"),
])
def test_bad_jsonl_names_the_file_and_what_is_wrong(tok, tmp_path, content, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(content)
    with pytest.raises(DataError) as err:
        pack(f"jsonl:{src}", tok, tmp_path / "o.tokens")
    assert str(src) in str(err.value) and message in str(err.value)
    assert not (tmp_path / "o.tokens").exists()


def test_bad_sources(tok, tmp_path):
    import datasets

    cases = [
        (f"jsonl:{tmp_path}/none/*.jsonl", "the glob matches no file"),
        (f"parquet:{tmp_path / 'missing.parquet'}", "no such file, directory or glob match"),
        (f"hf:{tmp_path}", "not a dataset saved with save_to_disk"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((f"jsonl:{tmp_path / 'empty'}", "has no .jsonl/.json files"))
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "zero"))
    cases.append((f"hf:{tmp_path / 'zero'}", "empty dataset (0 rows)"))
    datasets.Dataset.from_dict({"text": ["x"]}).select([]).to_parquet(str(tmp_path / "zero.parquet"))
    cases.append((f"parquet:{tmp_path / 'zero.parquet'}", "empty dataset (0 rows)"))
    datasets.Dataset.from_dict({"prompt": ["a"]}).to_parquet(str(tmp_path / "p.parquet"))
    for src, message in cases:
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
            pack(src, tok, tmp_path / "o.tokens")
    with pytest.raises(DataError, match="no column 'completion'"):
        pack(f"parquet:{tmp_path / 'p.parquet'}", tok, tmp_path / "o.tokens", fmt="sft")


def test_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "junk").mkdir()
    with pytest.raises(DataError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path / "junk"))
    with pytest.raises(DataError, match="no chat template"):
        load_tokenizer("byte").chat([{"role": "user", "content": "x"}])


def test_tokenizer_larger_than_the_model_is_an_error(tok, tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", [{"text": d} for d in corpus(20)])
    out = tmp_path / "d.tokens"
    pack(f"jsonl:{src}", tok, out)
    with pytest.raises(DataError, match="has 301 tokens but model.vocab_size is 256"):
        build_dataset(f"jsonl:{src}", 8, 0, 1000, vocab_size=256, tokenizer=tok, packed=(out, None))


def test_data_config_rules():
    with pytest.raises(ConfigError, match="data.format='sft' needs a dataset with columns"):
        load_config({"data": {"source": "tokens:x.tokens", "format": "sft"}})
    with pytest.raises(ConfigError, match="data.source='builtin' is byte text"):
        load_config({"data": {"tokenizer": "/some/dir"}})
    with pytest.raises(ConfigError, match="data.source='csv:x'"):
        load_config({"data": {"source": "csv:x"}})


# ------------------------------------------------------------------ model sources: bad input
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_checkpoint("llama", tmp_path_factory.mktemp("llama"))


def test_hf_path_fills_the_architecture_and_refuses_disagreement(llama_dir):
    cfg = load_config({"model": {"arch": "hf", "hf_path": str(llama_dir), "seq_len": 32}})
    m = cfg.model
    assert (m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff, m.hf_model_type) == \
        (139, 32, 2, 4, 2, 64, "llama")
    with pytest.raises(ConfigError) as err:
        load_config({"model": {"arch": "hf", "hf_path": str(llama_dir), "d_model": 64, "n_heads": 4}})
    assert "model.d_model=64 disagrees" in str(err.value) and "has 32" in str(err.value)
    assert "model.n_heads" not in str(err.value)  # n_heads=4 agrees
    with pytest.raises(ConfigError, match="model.seq_len=100 exceeds the checkpoint's max_position_embeddings=64"):
        load_config({"model": {"arch": "hf", "hf_path": str(llama_dir), "seq_len": 100}})
    with pytest.raises(ConfigError, match="needs model.arch='hf'"):
        load_config({"model": {"arch": "llama", "hf_path": str(llama_dir)}})


def test_bad_hf_sources(tmp_path, llama_dir):
    import shutil

    with pytest.raises(ConfigError, match="not a directory"):
        load_config({"model": {"arch": "hf", "hf_path": str(tmp_path / "none")}})
    (tmp_path / "noconf").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_config({"model": {"arch": "hf", "hf_path": str(tmp_path / "noconf")}})
    with pytest.raises(ConfigError, match="hf_model_type='no_such_model'.*causal-LM model_type"):
        load_config({"model": {"arch": "hf", "hf_model_type": "no_such_model"}})
    for model_type in ("qwen2", "gemma", "mistral", "phi3"):  # any causal LM, not only llama/gpt2
        assert load_config({"model": {"arch": "hf", "hf_model_type": model_type}}).model.hf_model_type == model_type
    weightless = tmp_path / "weightless"
    shutil.copytree(llama_dir, weightless)
    (weightless / "model.safetensors").unlink()
    from tetrad.checkpoint.fileio import CheckpointError
    from tetrad.checkpoint.hf_weights import HFWeights

    with pytest.raises(CheckpointError, match="no model.safetensors and no model.safetensors.index.json"):
        HFWeights(weightless)


def test_architecture_without_a_plan_says_how_to_add_one():
    from torch import nn

    from tetrad.parallel.plan import PlanError, hf_plan

    class Bare(nn.Module):
        config = type("Cfg", (), {"base_model_tp_plan": None})()

    with pytest.raises(PlanError, match=r"no tensor-parallel plan for model class Bare.*PLANS\['Bare'\]"):
        hf_plan(Bare())
    Bare.config.base_model_tp_plan = {"layers.*.mlp.experts": "grouped_gemm"}
    with pytest.raises(PlanError, match=r"style\(s\) \['grouped_gemm'\] that tetrad does not implement"):
        hf_plan(Bare())


def test_sequence_parallel_refusals_name_the_key():
    """Megatron-SP on an HF model refuses what it cannot shard (a parameter its plan does not
    cover, pipeline stages), and tetrad's attention function refuses attention dropout."""
    from types import SimpleNamespace

    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM

    from tetrad.config import ConfigError, load_strategy
    from tetrad.config.validate import problems, raise_all
    from tetrad.models import shape_of
    from tetrad.parallel.hf_context import _ring_attention
    from tetrad.parallel.plan import PlanError, hf_plan

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert any(p.endswith("self_attn") for p, _ in hf_plan(model, seq=True))  # the region enters once
    model.model.layers[0].self_attn.gate = nn.Linear(16, 1)
    with pytest.raises(PlanError, match=r"megatron_sp=true: model.layers.0.self_attn.gate .* not cover"):
        hf_plan(model, seq=True)
    assert hf_plan(model)  # plain tp enters per projection: the replicated gate is fine there
    shape = shape_of(model)  # the rule book, asked with the live model's shape, as the engine asks it
    with pytest.raises(ConfigError, match=r"megatron_sp=true with strategy.pp=2 on a Hugging Face model"):
        raise_all(problems(load_strategy({"tp": 2, "pp": 2, "megatron_sp": True}), model=shape))
    assert not problems(load_strategy({"tp": 2, "pp": 2}), model=shape)
    model.config.attention_dropout = 0.1
    with pytest.raises(ConfigError, match=r"strategy.sp=2, megatron_sp=False on a Hugging Face model needs "
                                          r"attention dropout 0 \(model.dropout=0.1\)"):
        raise_all(problems(load_strategy({"sp": 2}), model=shape_of(model)))
    attn = SimpleNamespace(tetrad_ring=lambda q, k, v, scale: q)
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match=r"attention dropout 0.1.*model.dropout: 0.0"):
        _ring_attention(attn, q, q, q, None, dropout=0.1)
