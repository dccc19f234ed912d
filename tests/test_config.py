"""tetrad.config: defaults, YAML round trip, overrides, and one test per error message."""
from __future__ import annotations

import re

import pytest
import yaml

from tetrad.config import Config, ConfigError, StrategyConfig, load_config, load_strategy

FULL_YAML = """
run: {output_dir: runs/x, seed: 7, steps: 20, global_batch_size: 16, precision: bf16, log_every: 5}
model: {arch: llama, vocab_size: 512, d_model: 128, n_layers: 4, n_heads: 8, n_kv_heads: 2,
        d_ff: 352, seq_len: 128, dropout: 0.1, norm_eps: 1e-6, rope_theta: 500000, tie_embeddings: true}
data: {source: "tokens:/data/train.bin", builtin_tokens: 5000}
optimizer: {name: adamw, lr: 6e-4, betas: [0.9, 0.99], eps: 1e-8, weight_decay: 0.0,
            grad_clip: 0, warmup_steps: 0, schedule: linear, min_lr_ratio: 0.0}
strategy:
  tp: 2
  pp: 2
  sp: 1
  megatron_sp: true
  dp: 2
  zero: 1
  micro_batch_size: 2
  recompute: budget
  recompute_budget_mb: 512
  pipeline_schedule: interleaved
  virtual_stages: 2
  bucket_mb: 50
  offload: {optimizer: nvme, params: none, nvme_dir: /nvme}
checkpoint: {dir: /ckpt, every: 10, keep: 3, async: false, resume: none}
logging: {tensorboard: false, progress: false}
"""


def test_defaults_from_empty_dict():
    cfg = load_config({})
    assert cfg == Config()
    assert cfg.model.n_kv_heads == cfg.model.n_heads == 4
    assert cfg.optimizer.betas == (0.9, 0.95)
    assert cfg.strategy.dp == "auto" and cfg.checkpoint.async_save is True
    assert cfg.checkpoint_dir == "runs/tiny/checkpoints"
    assert cfg.dp_degree(4) == 4 and cfg.num_micro_batches(4) == 2


def test_full_yaml_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(FULL_YAML)
    cfg = load_config(path, world_size=8)
    assert cfg.run.precision == "bf16" and cfg.model.norm_eps == 1e-6  # 1e-6 is a float, not a string
    assert cfg.model.rope_theta == 500000.0 and isinstance(cfg.model.rope_theta, float)
    assert cfg.strategy.offload.optimizer == "nvme" and cfg.checkpoint.async_save is False
    assert cfg.checkpoint_dir == "/ckpt" and cfg.data.kind == "tokens" and cfg.data.path == "/data/train.bin"
    dumped = cfg.to_dict()
    assert dumped["checkpoint"]["async"] is False and "async_save" not in dumped["checkpoint"]
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(dumped))
    assert load_config(again, world_size=8) == cfg
    assert load_config(cfg.to_dict()) == cfg


def test_overrides_convert_types():
    cfg = load_config({}, [
        "run.steps=50", "optimizer.lr=1e-3", "optimizer.weight_decay=0", "logging.progress=false",
        "strategy.offload.optimizer=cpu", "strategy.zero=1", "optimizer.betas=[0.8, 0.9]", "strategy.dp=4", "checkpoint.async=no",
    ])
    assert cfg.run.steps == 50 and cfg.optimizer.lr == 1e-3
    assert cfg.optimizer.weight_decay == 0.0 and isinstance(cfg.optimizer.weight_decay, float)
    assert cfg.logging.progress is False and cfg.checkpoint.async_save is False
    assert cfg.strategy.offload.optimizer == "cpu" and cfg.optimizer.betas == (0.8, 0.9)
    assert cfg.strategy.dp == 4 and cfg.dp_degree(4) == 4


def test_strategy_auto_forms():
    assert load_config({}, ["strategy=auto"]).strategy.auto is True
    cfg = load_config({"strategy": "auto"}, ["strategy.tp=2"], world_size=3)  # layout unchecked under auto
    assert cfg.strategy.auto and cfg.strategy.tp == 2
    assert cfg.strategy.to_dict() == {"auto": True, "tp": 2}  # the selector chooses the rest
    assert load_config({"strategy": {"auto": True}}).strategy == StrategyConfig(auto=True)


def test_load_strategy_sources(tmp_path):
    (tmp_path / "bare.yaml").write_text("tp: 2\nzero: 1\n")
    (tmp_path / "nested.yaml").write_text("strategy:\n  pp: 2\nmodel: {n_layers: 4}\n")
    assert load_strategy(tmp_path / "bare.yaml").tp == 2
    assert load_strategy(str(tmp_path / "nested.yaml")).pp == 2
    assert load_strategy("auto").auto and load_strategy({"sp": 2}).sp == 2
    given = StrategyConfig(tp=4)
    assert load_strategy(given) is given and given.resolve_dp(16) == 4


ERROR_CASES = [
    # (raw config, overrides, world_size, fragments the message must contain)
    ({"strategy": {"tpp": 2}}, [], None, ["strategy.tpp", "2", "did you mean 'strategy.tp'"]),
    ({"strategy": {"global_batch_size": 4}}, [], None, ["strategy.global_batch_size", "run.global_batch_size"]),
    ({"modle": {}}, [], None, ["modle", "did you mean 'model'"]),
    ({}, ["strategy.micro_batch=2"], None, ["strategy.micro_batch", "strategy.micro_batch_size"]),
    ({}, ["strategy.tp"], None, ["strategy.tp", "section.key=value"]),
    ({}, ["run.seed.x=1"], None, ["run.seed", "not a section"]),
    ({"strategy": {"tp": "2"}}, [], None, ["strategy.tp='2'", "integer"]),
    ({"strategy": {"pp": True}}, [], None, ["strategy.pp=True", "integer"]),
    ({"model": {"dropout": "0.1"}}, [], None, ["model.dropout='0.1'", "number"]),
    ({"optimizer": {"lr": None}}, [], None, ["optimizer.lr=None", "number"]),
    ({"logging": {"progress": 1}}, [], None, ["logging.progress=1", "true or false"]),
    ({"optimizer": {"betas": [0.9]}}, [], None, ["optimizer.betas=[0.9]", "2 numbers"]),
    ({"strategy": {"tp": 0}}, [], None, ["strategy.tp=0", ">= 1 and <= 4096"]),
    ({"strategy": {"pp": 5000}}, [], None, ["strategy.pp=5000", "<= 4096"]),
    ({"optimizer": {"lr": 0}}, [], None, ["optimizer.lr=0.0", "> 0"]),
    ({"model": {"dropout": 1.0}}, [], None, ["model.dropout=1.0", "< 1.0"]),
    ({"optimizer": {"betas": [0.9, 1.0]}}, [], None, ["optimizer.betas=(0.9, 1.0)", "each element"]),
    ({"strategy": {"zero": 4}}, [], None, ["strategy.zero=4", "<= 3"]),
    ({"run": {"precision": "fp8"}}, [], None, ["run.precision='fp8'", "'bf16'"]),
    ({"strategy": {"dp": "all"}}, [], None, ["strategy.dp='all'", "'auto'"]),
    ({"strategy": {"offload": {"params": "disk"}}}, [], None, ["strategy.offload.params='disk'", "'nvme'"]),
    ({"data": {"source": "csv:x"}}, [], None, ["data.source='csv:x'", "tokens:PATH"]),
    ({"model": {"d_model": 100, "n_heads": 3}}, [], None, ["model.d_model=100", "model.n_heads=3", "99 or 102"]),
    ({"model": {"n_kv_heads": 3}}, [], None, ["model.n_kv_heads=3", "model.n_heads=4"]),
    ({"model": {"arch": "hf"}}, [], None, ["model.hf_model_type=None", "model.arch='hf'", "'gpt2'"]),
    ({"strategy": {"tp": 3}}, [], None, ["model.n_heads=4", "strategy.tp=3", "1, 2, 4"]),
    ({"model": {"n_kv_heads": 1}, "strategy": {"tp": 2}}, [], None, ["model.n_kv_heads=1", "strategy.tp=2"]),
    ({"strategy": {"sp": 8}}, [], None, ["model.n_heads=4", "strategy.sp", "8"]),
    ({"model": {"n_heads": 2, "d_model": 64, "seq_len": 65}, "strategy": {"sp": 2}}, [], None,
     ["model.seq_len=65", "strategy.sp=2"]),
    ({"model": {"seq_len": 65}, "strategy": {"tp": 2, "megatron_sp": True}}, [], None,
     ["model.seq_len=65", "strategy.tp=2", "megatron_sp"]),
    ({"strategy": {"pp": 4}}, [], None, ["model.n_layers=2", "strategy.pp", "4"]),
    ({"strategy": {"virtual_stages": 2}}, [], None, ["strategy.virtual_stages=2", "'interleaved'"]),
    ({"strategy": {"pipeline_schedule": "interleaved"}}, [], None, ["strategy.pipeline_schedule='interleaved'", "pp"]),
    ({"strategy": {"offload": {"optimizer": "nvme"}}}, [], None, ["strategy.offload.nvme_dir=None", "'nvme'"]),
    ({"strategy": {"offload": {"params": "cpu"}}}, [], None, ["strategy.offload.params='cpu'", "strategy.zero=3"]),
    ({"strategy": {"pp": 1, "pipeline_schedule": "breadth_first"}}, [], None,
     ["strategy.pipeline_schedule='breadth_first'", "pp >= 2"]),
    ({"strategy": {"cp": 2}, "model": {"seq_len": 34}}, [], None,
     ["model.seq_len=34", "strategy.cp=2 (2*cp chunks, cp_load_balance)"]),
    ({"strategy": {"cp": 2}, "model": {"dropout": 0.1}}, [], None, ["strategy.cp=2", "dropout"]),
    ({"strategy": {"pp": 2, "pp_split": [1, 2]}}, [], None, ["strategy.pp_split=[1, 2]", "1 strictly"]),
    ({"strategy": {"pp": 2, "pipeline_schedule": "zero_bubble_v"}, "model": {"n_layers": 3}}, [], None,
     ["model.n_layers=3", "2*2=4"]),
    ({"strategy": {"cp": 2, "tp": 2}}, [], 6, ["world_size=6", "tp*pp*sp*cp=2*1*1*2=4"]),
    ({"strategy": {"recompute": "budget"}}, [], None, ["strategy.recompute_budget_mb=None", "'budget'"]),
    ({"strategy": {"tp": 2}}, [], 3, ["world_size=3", "strategy.tp", "multiples of 2"]),
    ({"strategy": {"tp": 2, "dp": 2}}, [], 8, ["strategy.dp=2", "world_size=8", "strategy.dp=4"]),
    ({"run": {"global_batch_size": 10}, "strategy": {"micro_batch_size": 2}}, [], 4,
     ["run.global_batch_size=10", "strategy.micro_batch_size=2", "dp=4", "8 or 16"]),
    ({"run": {"global_batch_size": 4}, "model": {"n_layers": 2}, "strategy": {"pp": 2, "micro_batch_size": 4}}, [], 2,
     ["run.global_batch_size=4", "strategy.pp=2", "strategy.micro_batch_size <= 2"]),
    ({}, [], 0, ["world_size=0", ">= 1"]),
]


@pytest.mark.parametrize("raw, overrides, world, fragments", ERROR_CASES,
                         ids=[str(i) for i in range(len(ERROR_CASES))])
def test_error_messages(raw, overrides, world, fragments):
    with pytest.raises(ConfigError, match=re.escape(fragments[0])) as info:
        load_config(raw, overrides, world_size=world)
    for fragment in fragments[1:]:
        assert fragment in str(info.value)


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("run:\n  steps: 5\nstrategy:\n  tp: 2\n   pp: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: malformed YAML at line 5"):
        load_config(path)


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    path = tmp_path / "top.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(path)


def test_missing_file_and_auto_skips_layout(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    load_config({"strategy": {"auto": True, "tp": 2}}, world_size=3)  # the selector picks the layout


def test_python_built_config_is_validated():
    cfg = Config(strategy=StrategyConfig(tp="2"))
    with pytest.raises(ConfigError, match=re.escape("strategy.tp='2'")):
        cfg.validate()
    with pytest.raises(ConfigError, match=re.escape("world_size=6")):
        StrategyConfig(tp=4).validate(world_size=6)
