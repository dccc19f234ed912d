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


def export(path: Path, out_dir: Path) -> list[Path]:
    """Write tetrad_model.safetensors + tetrad_config.json, and for gpt/llama/hf also the
    Hugging Face model.safetensors + config.json that ``from_pretrained(out_dir)`` reads."""
    from safetensors.torch import save_file

    from tetrad.checkpoint.hf_names import to_hf
    from tetrad.models.hf import hf_config

    ckpt = _checkpoints(path)[-1]
    reader = CheckpointReader(ckpt)
    model_cfg = reader.extra.get("config", {}).get("model")
    if model_cfg is None:
        raise CheckpointError(f"{ckpt}: manifest extra has no config.model; cannot describe the export")
    sd = model_state(reader)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "tetrad_model.safetensors", out_dir / "tetrad_config.json"]
    save_file(sd, str(written[0]), metadata={"format": "pt", "step": str(reader.step)})
    written[1].write_text(json.dumps(model_cfg, indent=1))
    hf_type, hf_sd = to_hf(model_cfg["arch"], sd, model_cfg["n_layers"])
    cfg = hf_config({**model_cfg, "arch": "hf", "hf_model_type": hf_type or model_cfg.get("hf_model_type")})
    save_file(hf_sd, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg.to_json_file(str(out_dir / "config.json"))
    return written + [out_dir / "model.safetensors", out_dir / "config.json"]


def ckpt_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="tetrad ckpt", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("inspect", help="list tensors, layout, step and integrity").add_argument("dir", type=Path)
    exp = sub.add_parser("export", help="consolidated safetensors model (+ Hugging Face config)")
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
