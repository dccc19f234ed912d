"""``python -m tetrad ckpt inspect DIR`` and ``python -m tetrad ckpt export DIR OUT``."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from tetrad.checkpoint.fileio import FROM_NAME, CheckpointError
from tetrad.checkpoint.pieces import Piece
from tetrad.checkpoint.reader import CheckpointReader, load_manifest, verify
from tetrad.checkpoint.writer import committed_steps, step_dirname


def _checkpoints(path: Path) -> list[Path]:
    """DIR itself if it is one checkpoint, else the committed checkpoints under it, oldest first."""
    if (path / "manifest.json").is_file():
        return [path]
    found = [path / step_dirname(s) for s in committed_steps(path)]
    if not found:
        raise CheckpointError(f"{path}: no manifest.json and no committed step_* checkpoints in it")
    return found


def inspect(path: Path, out=print) -> bool:
    """Print step, layout, files with their integrity, and every tensor; True when all intact."""
    ok = True
    for ckpt in _checkpoints(path):
        try:
            manifest = load_manifest(ckpt)
        except CheckpointError as e:
            out(f"{ckpt}: CORRUPT ({e})")
            ok = False
            continue
        out(f"{ckpt}: step {manifest['step']}, world size {manifest['world_size']}, "
            f"layout {json.dumps(manifest.get('layout', {}))}")
        for name, bad in verify(ckpt, manifest).items():
            size = manifest["files"][name]["bytes"]
            out(f"  file {name}  {size / 2**20:.2f} MiB  {'OK' if bad is None else 'CORRUPT: ' + bad}")
            ok = ok and bad is None
        for name, t in manifest["tensors"].items():
            out(f"  tensor {name}  {list(t['shape'])}  {t['dtype']}  {len(t['pieces'])} piece(s)")
        out(f"  extra keys: {sorted(manifest.get('extra', {}))}")
    out("integrity: OK" if ok else "integrity: CORRUPT")
    return ok


def model_state(reader: CheckpointReader, prefix: str = "model/") -> dict[str, torch.Tensor]:
    """Every ``model/`` tensor consolidated to its full shape, with the plain model's names."""
    sd = {}
    for name, meta in reader.tensors.items():
        if name.startswith(prefix):
            full = torch.empty(meta["shape"], dtype=FROM_NAME[meta["dtype"]])
            reader.fill([Piece(name, full, tuple(meta["shape"]))])
            sd[name[len(prefix):]] = full
    return sd


def export(path: Path, out_dir: Path, max_shard_size: int | str = "5GB") -> list[Path]:
    """Write a Hugging Face directory that ``AutoModelForCausalLM.from_pretrained(out_dir)``
    loads with no missing or unexpected keys: config.json, safetensors (sharded with an index
    above ``max_shard_size``) and, when the run used one, its tokenizer. Runs of tetrad's own
    gpt/llama also get tetrad_model.safetensors + tetrad_config.json (tetrad's names)."""
    from safetensors.torch import save_file

    from tetrad.checkpoint.hf_names import to_hf

    ckpt = _checkpoints(path)[-1]
    reader = CheckpointReader(ckpt)
    config = reader.extra.get("config", {})
    model_cfg = config.get("model")
    if model_cfg is None:
        raise CheckpointError(f"{ckpt}: manifest extra has no config.model; cannot describe the export")
    sd = model_state(reader)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if model_cfg["arch"] != "hf":
        written = [out_dir / "tetrad_model.safetensors", out_dir / "tetrad_config.json"]
        save_file(sd, str(written[0]), metadata={"format": "pt", "step": str(reader.step)})
        written[1].write_text(json.dumps(model_cfg, indent=1))
    hf_type, hf_sd = to_hf(model_cfg["arch"], sd, model_cfg["n_layers"])
    cfg = _hf_config(model_cfg, hf_type, ckpt)
    written += _save_sharded(hf_sd, out_dir, max_shard_size)
    cfg.to_json_file(str(out_dir / "config.json"))
    written.append(out_dir / "config.json")
    tokenizer = config.get("data", {}).get("tokenizer", "byte")
    if tokenizer != "byte":
        written += _copy_tokenizer(Path(tokenizer), out_dir)
    return written


def _hf_config(model_cfg: dict, hf_type: str, ckpt: Path):
    """The checkpoint's own config (``hf_path``) or one built from the model section."""
    from tetrad.models.hf import hf_config

    if model_cfg.get("hf_path") and not Path(model_cfg["hf_path"], "config.json").is_file():
        raise CheckpointError(f"{ckpt}: the run's model.hf_path {model_cfg['hf_path']!r} has no config.json "
                              f"any more; the export needs it to describe the architecture")
    cfg = hf_config({**model_cfg, "arch": "hf", "hf_model_type": hf_type or model_cfg.get("hf_model_type")})
    cfg.use_cache = True  # a training choice; generation wants the cache back
    cfg.dtype = "float32"  # tetrad's weights are the fp32 masters
    return cfg


def _save_sharded(sd: dict[str, torch.Tensor], out_dir: Path, max_shard_size) -> list[Path]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json
    (huggingface_hub's split, the layout save_pretrained writes)."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(sd, max_shard_size=max_shard_size)
    written = []
    for filename, names in split.filename_to_tensors.items():
        shard = {n: sd[n].contiguous() for n in names}
        save_file(shard, str(out_dir / filename), metadata={"format": "pt"})
        written.append(out_dir / filename)
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        written.append(out_dir / "model.safetensors.index.json")
    return written


def _copy_tokenizer(src: Path, out_dir: Path) -> list[Path]:
    from transformers import AutoTokenizer

    if not src.is_dir():
        raise CheckpointError(f"the run's data.tokenizer {str(src)!r} is not a directory any more; the "
                              f"export copies the tokenizer from it")
    before = set(out_dir.iterdir())
    AutoTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(str(out_dir))
    return sorted(set(out_dir.iterdir()) - before)


def ckpt_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tetrad ckpt", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("inspect", help="list tensors, layout, step and integrity").add_argument("dir", type=Path)
    exp = sub.add_parser("export", help="a Hugging Face model directory (safetensors, config.json, tokenizer)")
    exp.add_argument("dir", type=Path)
    exp.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.action == "inspect":
            return 0 if inspect(args.dir) else 1
        for f in export(args.dir, args.out):
            print(f"wrote {f} ({math.ceil(f.stat().st_size / 1024)} KiB)")
        return 0
    except CheckpointError as e:
        print(f"tetrad ckpt: {e}", file=sys.stderr)
        return 1
