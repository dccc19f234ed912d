"""Fine-tuning Hugging Face checkpoints end to end: the lr~0 round trip through export, real
fine-tunes on jsonl (tp=2, the shipped example under torchrun) and parquet (ZeRO-3), SFT
masking with the same token-weighted curve under every layout, and an exact resume.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from harness import run_distributed
from hf_families import FAMILIES, make_checkpoint, make_llama_for, make_tokenizer

pytest.importorskip("transformers")
pytest.importorskip("datasets")

EXAMPLE = Path(__file__).parent.parent / "examples" / "finetune_hf.py"


def _example():
    spec = importlib.util.spec_from_file_location("finetune_hf", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_config(out, ckpt, source, steps, *, tokenizer="byte", fmt="pretrain", lr=3e-3, every=0,
               global_batch=8, seq_len=16, **strategy) -> dict:
    return {"run": {"output_dir": str(out), "seed": 2, "steps": steps, "global_batch_size": global_batch},
            "model": {"arch": "hf", "hf_path": str(ckpt), "seq_len": seq_len},
            "data": {"source": source, "tokenizer": tokenizer, "format": fmt},
            "optimizer": {"lr": lr, "warmup_steps": 0, "schedule": "constant"},
            "strategy": {"micro_batch_size": 1, **strategy},
            "checkpoint": {"every": every},
            "logging": {"tensorboard": False, "progress": False}}


def _fit_all(rank: int, world: int, configs: list[dict]) -> list[list[float]]:
    from tetrad.trainer.trainer import Trainer

    return [[r["loss"] for r in Trainer(c).fit()] for c in configs]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tetrad.data import builtin_tokens, write_tokens

    root = tmp_path_factory.mktemp("finetune")
    tokens = root / "text.tokens"
    write_tokens(tokens, builtin_tokens(20000, seed=1), vocab_size=128)
    tok = make_tokenizer(root / "tokenizer")
    return {"root": root, "tokens": f"tokens:{tokens}", "tokenizer": tok,
            "ckpts": {f: make_checkpoint(f, root / f, seed=4) for f in FAMILIES},
            "tok_llama": make_llama_for(tok, root / "tok_llama", seed=5)}


# ------------------------------------------------------------------ lr ~ 0 round trip
@pytest.mark.slow
def test_lr0_round_trip_every_family_and_layout(assets, tmp_path):
    """Load hf_path, one step at lr 1e-9, export: the exported tensors are the originals, and
    transformers loads the directory with no missing or unexpected keys."""
    import torch
    import transformers
    from safetensors.torch import load_file

    from tetrad.cli import main

    root = assets["root"]
    (root / "tok.jsonl").write_text("".join(json.dumps({"text": f"the cat {i} sees the dog."}) + "\n"
                                            for i in range(64)))
    runs = [(f, {"tp": 2}, assets["ckpts"][f], assets["tokens"], "byte") for f in FAMILIES]
    runs += [(f, {"zero": 3}, assets["ckpts"][f], assets["tokens"], "byte") for f in ("llama", "gpt2")]
    runs.append(("llama+tokenizer", {"tp": 2}, assets["tok_llama"], f"jsonl:{root / 'tok.jsonl'}",
                 str(assets["tokenizer"])))
    configs = [run_config(tmp_path / str(i), ckpt, src, 1, tokenizer=tok, lr=1e-9, every=1, **s)
               for i, (_, s, ckpt, src, tok) in enumerate(runs)]
    run_distributed(_fit_all, 2, configs, timeout=600)
    for i, (family, strategy, ckpt, _, tok) in enumerate(runs):
        out = tmp_path / f"export{i}"
        assert main(["ckpt", "export", str(tmp_path / str(i) / "checkpoints"), str(out)]) == 0
        original, exported = load_file(Path(ckpt) / "model.safetensors"), load_file(out / "model.safetensors")
        model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], (family, strategy, info)
        assert set(exported) <= set(original), (family, sorted(set(exported) - set(original)))
        for name, t in exported.items():
            diff = (t.float() - original[name].float()).abs().max().item()
            assert diff < 1e-5, (family, strategy, name, diff)
        for name, p in model.state_dict().items():  # tied tensors are saved once, loaded twice
            if name in original:
                torch.testing.assert_close(p, original[name].float(), rtol=0, atol=1e-5)
        if tok != "byte":
            assert len(transformers.AutoTokenizer.from_pretrained(out)) == len(
                transformers.AutoTokenizer.from_pretrained(tok))


def test_export_shards_above_the_size_limit(assets, tmp_path):
    """Above max_shard_size the export is sharded with an index, as save_pretrained writes."""
    import transformers
    from safetensors.torch import load_file

    from tetrad.checkpoint.cli import _save_sharded

    sd = load_file(assets["ckpts"]["llama"] / "model.safetensors")
    written = _save_sharded(sd, tmp_path, max_shard_size=20_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(written) > 3 and set(index["weight_map"]) == set(sd)
    transformers.AutoConfig.from_pretrained(assets["ckpts"]["llama"]).save_pretrained(tmp_path)
    _, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


# ------------------------------------------------------------------ real fine-tunes
@pytest.mark.slow
def test_example_finetunes_on_jsonl_at_tp2(tmp_path):
    """The shipped example: torchrun, 2 processes, tp=2, exported and reloaded by transformers."""
    result = _example().main(["--workdir", str(tmp_path), "--steps", "30", "--strategy", "tp"])
    assert not result["missing_keys"] and not result["unexpected_keys"]
    assert result["held_out_loss_after"] < result["held_out_loss_before"] - 1.0, result
    assert result["generated"].startswith("the red cat")


@pytest.mark.slow
def test_finetune_on_parquet_at_zero3(tmp_path):
    from tetrad.cli import main

    ex = _example()
    tok = ex.make_tokenizer(tmp_path / "tokenizer")
    base = ex.make_model(tok, tmp_path / "base")
    source, held_out = ex.write_data(tmp_path, "parquet")
    cfg = run_config(tmp_path / "run", base, source, 30, tokenizer=str(tok), every=30, global_batch=16,
                     seq_len=64, zero=3, micro_batch_size=4)
    losses = run_distributed(_fit_all, 2, [cfg], timeout=600)[0][0]
    assert losses[-1] < losses[0] - 1.0
    assert main(["ckpt", "export", str(tmp_path / "run" / "checkpoints"), str(tmp_path / "out")]) == 0
    before = ex.held_out_loss(base, tok, held_out)
    after = ex.held_out_loss(tmp_path / "out", tmp_path / "out", held_out)
    assert after < before - 1.0, (before, after)


# ------------------------------------------------------------------ SFT
def _sft_records(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    words = ["cat", "dog", "bird", "fox", "king", "robot"]
    out = []
    for i in range(n):  # prompts and completions of varied lengths: ranks hold unequal token counts
        p = " ".join(rng.choice(words, size=int(rng.integers(1, 12))))
        c = " ".join(rng.choice(words, size=int(rng.integers(1, 6))))
        out.append({"prompt": f"q: {p}? a: ", "completion": f"{c}."})
    return out


def _sft_reference(rank: int, world: int, cfg: dict, resume: list[dict]) -> dict:
    """dp=1 curve, transformers' loss on the first global batch, and the resume runs."""
    import torch
    import transformers

    from tetrad.data import GlobalBatchSampler
    from tetrad.trainer.trainer import Trainer

    trainer = Trainer(cfg)
    losses = [r["loss"] for r in trainer.fit()]
    sampler = GlobalBatchSampler(len(trainer.dataset), cfg["run"]["global_batch_size"], cfg["run"]["seed"])
    x, y = trainer.dataset.get_batch(sampler.next_indices())
    model = transformers.AutoModelForCausalLM.from_pretrained(cfg["model"]["hf_path"], dtype=torch.float32)
    with torch.no_grad():  # transformers averages over every unmasked token of the batch
        hf_first = float(model(input_ids=x, labels=y, shift_labels=y).loss)
    masked = float((y == -100).float().mean())
    resumed = [[(r["step"], r["loss"]) for r in Trainer(c).fit()] for c in resume]
    return {"losses": losses, "hf_first": hf_first, "masked": masked, "resumed": resumed}


@pytest.mark.slow
def test_sft_masks_prompts_and_every_layout_gives_the_same_curve(assets, tmp_path):
    root = assets["root"]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _sft_records(120)))
    source, tok, ckpt = f"jsonl:{root / 'sft.jsonl'}", str(assets["tokenizer"]), assets["tok_llama"]

    def cfg(name, steps=8, **kw):
        return run_config(tmp_path / name, ckpt, source, steps, tokenizer=tok, fmt="sft", **kw)

    resume = [cfg("resume", steps=4, every=4), cfg("resume", steps=8, every=4)]  # 4 steps, then resume to 8
    ref = run_distributed(_sft_reference, 1, cfg("ref"), resume, timeout=600)[0]
    assert 0.3 < ref["masked"] < 0.9  # the prompts really are masked, and completions remain
    np.testing.assert_allclose(ref["losses"][0], ref["hf_first"], rtol=1e-5)
    assert [s for s, _ in ref["resumed"][1]] == [5, 6, 7, 8]
    np.testing.assert_allclose([loss for _, loss in ref["resumed"][1]], ref["losses"][4:], rtol=1e-5)
    layouts = [{"micro_batch_size": 4}, {"micro_batch_size": 1}, {"zero": 2, "micro_batch_size": 2},
               {"tp": 2, "micro_batch_size": 2}]
    results = run_distributed(_fit_all, 2, [cfg(f"l{i}", **s) for i, s in enumerate(layouts)], timeout=600)
    for i, strategy in enumerate(layouts):
        np.testing.assert_allclose(results[0][i], ref["losses"], rtol=1e-5, err_msg=str(strategy))


def test_prompt_tokens_contribute_nothing(assets, tmp_path):
    """The engine's loss over a batch is the mean over the completion labels alone: positions
    labelled -100 (the prompt) add no term, in the value and so in the gradient."""
    import torch

    from tetrad.engine import Engine
    from tetrad.models import build_model

    model = build_model({"arch": "hf", "hf_path": str(assets["tok_llama"])})
    engine = Engine(model, strategy={"micro_batch_size": 2}, global_batch_size=4)
    x = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 200, (4, 16), generator=torch.Generator().manual_seed(1))
    y[:, :9] = -100  # the prompt's labels
    with torch.no_grad():
        logits = engine.model(x)
        want = torch.nn.functional.cross_entropy(logits[:, 9:].reshape(-1, logits.shape[-1]), y[:, 9:].reshape(-1))
    got = engine.train_step((x, y))
    np.testing.assert_allclose(got, float(want), rtol=1e-5)
