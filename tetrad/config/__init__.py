"""Typed run configuration: dataclasses loaded strictly from YAML, with `--set a.b=c` overrides.

    cfg = load_config("run.yaml", overrides=["strategy.tp=2"], world_size=8)
    cfg.strategy.tp, cfg.dp_degree(8), cfg.checkpoint_dir
"""
from tetrad.config.errors import ConfigError
from tetrad.config.load import apply_override, load_config, load_strategy, parse_yaml
from tetrad.config.schema import (
    MAX_DEGREE,
    CheckpointConfig,
    Config,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OffloadConfig,
    OptimizerConfig,
    RunConfig,
    StrategyConfig,
)

__all__ = [
    "MAX_DEGREE", "CheckpointConfig", "Config", "ConfigError", "DataConfig", "LoggingConfig",
    "ModelConfig", "OffloadConfig", "OptimizerConfig", "RunConfig", "StrategyConfig",
    "apply_override", "load_config", "load_strategy", "parse_yaml",
]
