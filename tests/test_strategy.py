"""Search space, pruning reasons (the rule book's), and `tetrad plan`."""

import json

import yaml

from tetrad.cli import main
from tetrad.config import ConfigError, load_config
from tetrad.models.args import ModelArgs
from tetrad.strategy.hardware import load_hardware
from tetrad.strategy.spec_costs import SpecCosts
from tetrad.strategy.search import search
from tetrad.strategy.space import Space

MODEL = {"arch": "gpt", "vocab_size": 256, "d_model": 96, "n_layers": 4, "n_heads": 6, "seq_len": 64}


def _cfg(strategy="auto", batch=16):
    return load_config({"run": {"global_batch_size": batch, "precision": "bf16"}, "model": MODEL,
                        "strategy": strategy})


def _costs(cfg):
    return SpecCosts(load_hardware("a100_80gb_cluster"), ModelArgs.from_config(cfg.model), "bf16")


def test_invalid_layouts_are_pruned_with_configs_reason():
    space = Space(_cfg(), 8)
    layouts = list(space.layouts())
    assert all(MODEL["n_heads"] % s.tp == 0 for s in layouts)
    reasons = [r for s, r in space.rejected if s.tp == 4]
    assert reasons and "model.n_heads=6 is not divisible by strategy.tp=4" in reasons[0]


def test_fixed_keys_are_kept():
    cfg = _cfg({"auto": True, "tp": 2, "zero": 1})
    plan = search(cfg, 8, _costs(cfg))
    assert plan.ranked and all(e.strategy.tp == 2 and e.strategy.zero == 1 for e in plan.ranked)


def test_candidates_the_rule_book_refuses_are_pruned_with_its_reason():
    """The search asks the engine's own rule book: a fixed offload.step delayed needs an
    offloaded optimizer, so every ranked layout has one and the rest carry the rule's words."""
    cfg = _cfg({"auto": True, "offload": {"step": "delayed"}})
    plan = search(cfg, 4, _costs(cfg))
    assert plan.ranked and all(e.strategy.offload.optimizer != "none" and e.strategy.zero >= 1
                               for e in plan.ranked)
    assert any("step='delayed' needs strategy.offload.optimizer cpu or nvme" in r for _, r in plan.rejected)


def test_nothing_fits_names_the_reason():
    cfg = _cfg()
    plan = search(cfg, 4, _costs(cfg), budget=1e3)
    assert plan.chosen is None
    assert any("out of memory" in r for r in plan.reason_counts())
    from tetrad.strategy.search import chosen_strategy

    try:
        chosen_strategy(plan, 4)
    except ConfigError as err:
        assert "out of memory" in str(err)
    else:
        raise AssertionError("expected ConfigError")


def test_plan_cli_for_a_cluster_spec(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run": {"global_batch_size": 64, "precision": "bf16"}, "model": MODEL,
                                      "strategy": "auto"}))
    out, cand = tmp_path / "strategy.yaml", tmp_path / "all.json"
    rc = main(["plan", str(config), "--world-size", "16", "--hardware", "h100_80gb_cluster", "--top", "3",
               "--out", str(out), "--json", str(cand)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "tokens/s" in text and "chosen:" in text and "rejected or pruned" in text
    chosen = yaml.safe_load(out.read_text())["strategy"]
    assert chosen["tp"] * chosen["pp"] * chosen["sp"] * chosen["dp"] == 16
    data = json.loads(cand.read_text())
    assert data["chosen"]["strategy"]["tp"] == chosen["tp"] and data["invalid"]
    # The written strategy loads back as a run's strategy.
    load_config({"model": MODEL, "run": {"global_batch_size": 64}, "strategy": chosen}, world_size=16)
