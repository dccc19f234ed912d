"""``tetrad ckpt inspect`` and ``tetrad ckpt export``: the export loads into Hugging Face models."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from harness import run_distributed
from test_checkpoint_resume import _fit, ckpt_config
from tetrad.cli import main


@pytest.fixture(scope="module", params=["llama", "gpt"])
def trained(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    cfg = ckpt_config(str(out), every=2, micro_batch_size=4)
    cfg["run"]["steps"] = 2
    cfg["model"]["arch"] = request.param
    if request.param == "gpt":
        cfg["model"]["n_kv_heads"] = None
    run_distributed(_fit, 2, cfg)
    return out / "checkpoints", cfg["model"]


def test_inspect_reports_layout_tensors_and_corruption(trained, capsys):
    root, _ = trained
    assert main(["ckpt", "inspect", str(root)]) == 0
    text = capsys.readouterr().out
    assert "step 2, world size 2" in text and '"dp": 2' in text
    assert "rank_00001.safetensors" in text and "integrity: OK" in text
    assert "tensor model/tok_emb.weight  [256, 32]  float32  1 piece(s)" in text
    assert "tensor optim/exp_avg/layers.0.attn.q_proj.weight" in text


def test_inspect_flags_a_corrupt_file(trained, tmp_path, capsys):
    import shutil

    root, _ = trained
    copy = tmp_path / "step_00000002"
    shutil.copytree(root / "step_00000002", copy)
    shard = copy / "rank_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["ckpt", "inspect", str(copy)]) == 1
    text = capsys.readouterr().out
    assert "rank_00000.safetensors" in text and "CORRUPT: crc32" in text and "integrity: CORRUPT" in text
    assert main(["ckpt", "export", str(copy), str(tmp_path / "out")]) == 1
    assert "rank_00000.safetensors: crc32" in capsys.readouterr().err


def test_export_loads_into_hugging_face(trained, tmp_path):
    import transformers
    from safetensors.torch import load_file

    from tetrad.models import build_model

    root, model_cfg = trained
    assert main(["ckpt", "export", str(root), str(tmp_path)]) == 0
    ours = build_model(SimpleNamespace(**{**model_cfg, "n_kv_heads": model_cfg["n_kv_heads"] or 4,
                                          "hf_model_type": None})).eval()
    ours.load_state_dict(load_file(tmp_path / "tetrad_model.safetensors"))
    assert json.loads((tmp_path / "tetrad_config.json").read_text())["arch"] == model_cfg["arch"]
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path)
    cls = transformers.LlamaForCausalLM if model_cfg["arch"] == "llama" else transformers.GPT2LMHeadModel
    hf = cls(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=False)
    assert not unexpected and all("rotary" in k or "attn.bias" in k for k in missing), missing
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=x).logits, ours(x), rtol=1e-5, atol=1e-5)
