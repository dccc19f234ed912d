"""Property-based fuzzing of the config loader: any input gives a Config or a ConfigError."""

import string

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from tetrad.config import Config, ConfigError, load_config
from tetrad.config.schema import (CheckpointConfig, DataConfig, LoggingConfig, ModelConfig,
                                  OptimizerConfig, RunConfig, StrategyConfig)

SECTIONS = {"run": RunConfig, "model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig,
            "strategy": StrategyConfig, "checkpoint": CheckpointConfig, "logging": LoggingConfig}
KEYS = {name: [f for f in cls.__dataclass_fields__ if not f.startswith("_")] + ["async", "bogus"]
        for name, cls in SECTIONS.items()}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["auto", "fp32", "bf16", "llama", "cpu", "nvme", "1f1b", "builtin"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                      max_leaves=6)


@st.composite
def configs(draw):
    out = {}
    for section in draw(st.lists(st.sampled_from(list(SECTIONS) + ["extra"]), max_size=4, unique=True)):
        keys = KEYS.get(section, ["x"])
        out[section] = draw(st.one_of(
            values, st.dictionaries(st.sampled_from(keys), values, max_size=4)))
    return out


def _check(source, overrides=()):
    try:
        cfg = load_config(source, overrides, world_size=4)
    except ConfigError as err:
        assert str(err)  # every refusal says why
        return
    assert isinstance(cfg, Config)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_any_mapping_loads_or_raises_config_error(raw):
    _check(raw)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=string.printable, max_size=200))
def test_any_yaml_text_loads_or_raises_config_error(text):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "c.yaml"
        path.write_text(text)
        _check(path)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet=string.ascii_letters + string.digits + "._=-: []{}", max_size=30),
                max_size=3))
def test_any_override_loads_or_raises_config_error(overrides):
    _check({}, overrides)
