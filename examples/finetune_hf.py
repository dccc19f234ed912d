"""Fine-tune a Hugging Face model with tetrad, end to end, on this machine (nothing downloads).

    python examples/finetune_hf.py --workdir runs/finetune_hf [--strategy tp|zero3] [--data jsonl|parquet]

1. makes a small local model and tokenizer: a byte-level BPE trained on generated text
   (its odd vocabulary, 301, is padded internally under tp=2) and a llama of that vocabulary,
   both written with ``save_pretrained`` -- stand-ins for a checkpoint you already have;
2. writes the training and held-out text as jsonl (or parquet);
3. fine-tunes it with ``torchrun --nproc_per_node 2 -m tetrad train`` under tensor
   parallelism (``--strategy tp``) or ZeRO-3 (``--strategy zero3``);
4. exports the last checkpoint with ``python -m tetrad ckpt export`` to a Hugging Face
   directory, reloads it with ``AutoModelForCausalLM`` / ``AutoTokenizer``, compares the
   held-out loss before and after, and generates a few tokens.

With a real checkpoint, steps 1-2 are ``model.hf_path: /path/to/model``,
``data.tokenizer: /path/to/model`` and ``data.source: jsonl:/path/to/data/*.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

STRATEGIES = {"tp": {"tp": 2, "micro_batch_size": 8}, "zero3": {"zero": 3, "micro_batch_size": 4}}


def _documents(n: int, seed: int) -> list[str]:
    from tetrad.data import builtin_text

    lines = builtin_text(60 * n, seed).decode().splitlines()
    return [line.split(": ", 1)[1] for line in lines[:n]]


def make_tokenizer(out: Path) -> Path:
    """A byte-level BPE with an EOS token, trained on generated text."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_documents(2000, seed=9), trainers.BpeTrainer(
        vocab_size=301, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(out)
    return out


def make_model(tokenizer: Path, out: Path) -> Path:
    """A small llama whose vocabulary is the tokenizer's."""
    import transformers

    vocab = len(transformers.AutoTokenizer.from_pretrained(tokenizer))
    cfg = transformers.AutoConfig.for_model(
        "llama", vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=None, eos_token_id=0, pad_token_id=None)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


def write_data(workdir: Path, kind: str) -> tuple[str, list[str]]:
    """(data.source of the training set, held-out documents)."""
    train, held_out = _documents(3000, seed=1), _documents(200, seed=2)
    if kind == "parquet":
        import datasets

        datasets.Dataset.from_dict({"text": train}).to_parquet(str(workdir / "train.parquet"))
        return f"parquet:{workdir / 'train.parquet'}", held_out
    with open(workdir / "train.jsonl", "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in train)
    return f"jsonl:{workdir / 'train.jsonl'}", held_out


def config(workdir: Path, model: Path, tokenizer: Path, source: str, strategy: str, steps: int) -> Path:
    import yaml

    cfg = {"run": {"output_dir": str(workdir / "run"), "steps": steps, "global_batch_size": 16, "seed": 0},
           "model": {"arch": "hf", "hf_path": str(model), "seq_len": 64},
           "data": {"source": source, "tokenizer": str(tokenizer)},
           "optimizer": {"lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.0},
           "strategy": STRATEGIES[strategy],
           "checkpoint": {"every": steps},
           "logging": {"tensorboard": False}}
    path = workdir / "finetune.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def held_out_loss(model_dir: Path, tokenizer_dir: Path, docs: list[str]) -> float:
    """Mean next-token loss of a Hugging Face model over held-out documents (transformers' own)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([sum((tok(d)["input_ids"] + [tok.eos_token_id] for d in docs), [])])
    losses = []
    with torch.no_grad():
        for chunk in ids[:, : ids.shape[1] // 64 * 64].split(64, dim=1):
            losses.append(float(model(input_ids=chunk, labels=chunk).loss))
    return sum(losses) / len(losses)


def _run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(cmd, check=True, env=env)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("runs/finetune_hf"))
    parser.add_argument("--strategy", choices=sorted(STRATEGIES), default="tp")
    parser.add_argument("--data", choices=("jsonl", "parquet"), default="jsonl")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args(argv)
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(work / "tokenizer")
    model = make_model(tokenizer, work / "base_model")
    source, held_out = write_data(work, args.data)
    cfg = config(work, model, tokenizer, source, args.strategy, args.steps)
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "tetrad", "train", str(cfg)])
    _run([sys.executable, "-m", "tetrad", "ckpt", "export", str(work / "run" / "checkpoints"), str(work / "export")])

    import transformers

    tuned, info = transformers.AutoModelForCausalLM.from_pretrained(work / "export", output_loading_info=True)
    tok = transformers.AutoTokenizer.from_pretrained(work / "export")
    prompt = tok("the red cat", return_tensors="pt")
    out = tuned.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    result = {"held_out_loss_before": held_out_loss(model, tokenizer, held_out),
              "held_out_loss_after": held_out_loss(work / "export", work / "export", held_out),
              "missing_keys": sorted(info["missing_keys"]), "unexpected_keys": sorted(info["unexpected_keys"]),
              "generated": tok.decode(out[0])}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
