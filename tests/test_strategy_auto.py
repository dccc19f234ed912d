"""`strategy: auto` through the Trainer on real gloo ranks: profile, choose, write, train."""

import json

import pytest
import yaml

from harness import run_distributed


def _auto_config(out: str, verify: int = 0) -> dict:
    return {"run": {"output_dir": out, "steps": 2, "global_batch_size": 4, "seed": 1},
            "model": {"arch": "llama", "vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 4,
                      "seq_len": 32},
            "data": {"builtin_tokens": 5000},
            "strategy": {"auto": True, "verify": verify},
            "logging": {"tensorboard": False, "progress": False},
            "checkpoint": {"resume": "none"}}


def _fit(rank, world, cfg):
    from tetrad.trainer.trainer import Trainer

    trainer = Trainer(cfg)
    history = trainer.fit()
    return trainer.config.strategy.to_dict(full=True), history[-1]["loss"]


@pytest.mark.slow
def test_auto_trains_and_writes_the_choice(tmp_path):
    out = str(tmp_path / "run")
    results = run_distributed(_fit, 2, _auto_config(out, verify=2), timeout=180)
    (s0, loss0), (s1, loss1) = results
    assert s0 == s1, "every rank must choose the same layout"
    assert s0["auto"] is False and s0["tp"] * s0["pp"] * s0["sp"] * s0["dp"] == 2
    assert loss0 == loss1 and loss0 > 0
    written = yaml.safe_load((tmp_path / "run" / "strategy.yaml").read_text())["strategy"]
    assert {k: written[k] for k in ("tp", "pp", "sp", "zero", "micro_batch_size")} == \
        {k: s0[k] for k in ("tp", "pp", "sp", "zero", "micro_batch_size")}
    candidates = json.loads((tmp_path / "run" / "strategy_candidates.json").read_text())
    assert candidates["chosen"]["measured_step_s"] is not None  # verify: 2 measured it
    assert candidates["ranked"] and (tmp_path / "run" / "profile.json").exists()
    # The run's config records the resolved layout, not `auto`.
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["strategy"]
    assert saved.get("auto") is False and saved["tp"] == s0["tp"]
