"""Hostile and broken input that the older suites do not already cover, case by case.

Covered elsewhere (see docs/reliability.md): typed/unknown-key/layout errors in
test_config.py, the hypothesis fuzz in test_config_fuzz.py, token files in test_data.py,
corrupted/pickled/escaping checkpoints in test_checkpoint_format.py and test_checkpoint_crash.py.
"""

from __future__ import annotations

import re

import pytest

from harness import run_distributed
from tetrad.config import ConfigError, load_config
from test_dp_parity import tiny_config

YAML_CASES = {
    # name: (file text, fragment of the error)
    "python tag runs nothing": ('run: !!python/object/apply:os.system ["touch {marker}"]\n',
                                "could not determine a constructor"),
    "duplicate key": ("run:\n  steps: 5\n  steps: 7\n", "key 'steps' appears twice"),
    "tab indentation": ("run:\n\tsteps: 5\n", "malformed YAML at line 2"),
    "unclosed flow": ("run: {steps: 5\n", "malformed YAML"),
    "alias bomb": ("run:\n  steps: [&a [1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                   "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                   "&e [*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e], "
                   "&g [*f,*f,*f,*f,*f,*f,*f,*f,*f], &h [*g,*g,*g,*g,*g,*g,*g,*g,*g], "
                   "&i [*h,*h,*h,*h,*h,*h,*h,*h,*h]]\n", "run.steps=[[1, 1, 1, 1, 1, 1, ...]"),
}


@pytest.mark.parametrize("name", list(YAML_CASES))
def test_hostile_yaml_is_refused_quickly_and_runs_nothing(tmp_path, name):
    marker = tmp_path / "pwned"
    text, fragment = YAML_CASES[name]
    path = tmp_path / "c.yaml"
    path.write_text(text.replace("{marker}", str(marker)))
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        load_config(path)  # the alias bomb (9**9 shared leaves) must not be expanded into a message
    assert not marker.exists()


def test_binary_file_is_a_config_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe\x00\x01binary")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(path)


VALUE_CASES = [
    # paths for files tetrad writes: absolute is allowed, a relative one may not climb out
    ({"checkpoint": {"dir": "../elsewhere"}}, ["checkpoint.dir='../elsewhere'", "without '..'"]),
    ({"checkpoint": {"dir": "ok/../../up"}}, ["checkpoint.dir='ok/../../up'", "relative to run.output_dir"]),
    ({"run": {"output_dir": "runs/a\0b"}}, ["run.output_dir=", "NUL"]),
    ({"data": {"source": "tokens:/x\0y"}}, ["data.source=", "NUL"]),
    ({"strategy": {"offload": {"optimizer": "nvme", "nvme_dir": " "}}}, ["strategy.offload.nvme_dir", "non-empty"]),
    # negative, zero and huge numbers
    ({"run": {"seed": -1}}, ["run.seed=-1", ">= 0"]),
    ({"run": {"global_batch_size": 2**40}}, ["run.global_batch_size=1099511627776", "<= 2147483647"]),
    ({"model": {"d_model": 10**12}}, ["model.d_model=1000000000000", "<= 2147483647"]),
    ({"model": {"n_layers": 2**70}}, ["model.n_layers=", "<= 2147483647"]),
    ({"run": {"steps": 10**12}}, ["run.steps=1000000000000", "<= 1000000000"]),
    ({"checkpoint": {"every": -5}}, ["checkpoint.every=-5", ">= 0"]),
    ({"checkpoint": {"keep": 0}}, ["checkpoint.keep=0", ">= 1"]),
    ({"optimizer": {"lr": float("nan")}}, ["optimizer.lr=nan", "number"]),
    ({"optimizer": {"grad_clip": -1.0}}, ["optimizer.grad_clip=-1.0", ">= 0"]),
    ({"run": {"collective_timeout_s": 0}}, ["run.collective_timeout_s=0.0", ">= 1.0"]),
    ({"run": {"collective_timeout_s": 10**9}}, ["run.collective_timeout_s=", "<= 86400"]),
    ({"run": {"max_skipped_steps": 0}}, ["run.max_skipped_steps=0", ">= 1"]),
]


@pytest.mark.parametrize("raw, fragments", VALUE_CASES, ids=[str(i) for i in range(len(VALUE_CASES))])
def test_bad_values_name_key_value_and_what_is_valid(raw, fragments):
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_relative_checkpoint_dir_lives_under_the_output_dir():
    assert load_config({"run": {"output_dir": "r"}, "checkpoint": {"dir": "ck"}}).checkpoint_dir == "r/ck"
    assert load_config({"checkpoint": {"dir": "/abs/ck"}}).checkpoint_dir == "/abs/ck"


def _fit(rank: int, world: int, config: dict) -> int:
    from tetrad.trainer.trainer import Trainer

    return len(Trainer(config).fit())


def test_checkpoint_from_another_model_is_refused_naming_tensor_and_shapes(tmp_path):
    cfg = tiny_config(str(tmp_path), micro_batch_size=4)
    cfg["run"]["steps"], cfg["checkpoint"] = 2, {"every": 2}
    run_distributed(_fit, 1, cfg)
    cfg["model"]["d_model"], cfg["run"]["steps"] = 64, 4
    with pytest.raises(RuntimeError, match=r"CheckpointError: .*step_00000002: tensor '[^']+' has shape "
                                           r"\(\d+, 32\), this run expects \(\d+, 64\)"):
        run_distributed(_fit, 1, cfg)
