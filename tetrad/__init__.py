"""tetrad: distributed large-model training on PyTorch.

    import tetrad
    engine = tetrad.parallelize(model, optimizer=opt, strategy="strategy.yaml")
    loss = engine.train_step((input_ids, labels))

or the whole loop: ``tetrad.Trainer(config).fit()``.
"""

from tetrad.config import Config, ConfigError, StrategyConfig, load_config, load_strategy

__version__ = "0.1.0"

Strategy = StrategyConfig


def parallelize(model, optimizer=None, strategy=None, **kwargs):
    """Wrap a plain model (and optionally its optimizer) in an :class:`Engine` for ``strategy``.

    ``strategy`` is a :class:`Strategy`, a dict, a path to a YAML file, or None (plain data
    parallelism over every launched rank). Extra keyword arguments go to ``Engine``.
    """
    from tetrad.engine import Engine

    return Engine(model, optimizer=optimizer, strategy=strategy, **kwargs)


def __getattr__(name):
    # Heavy imports (models, data, tensorboard) happen only when the loop is used.
    if name == "Trainer":
        from tetrad.trainer.trainer import Trainer
        return Trainer
    if name == "Engine":
        from tetrad.engine import Engine
        return Engine
    raise AttributeError(f"module 'tetrad' has no attribute {name!r}")


__all__ = ["Config", "ConfigError", "Engine", "Strategy", "StrategyConfig", "Trainer",
           "load_config", "load_strategy", "parallelize"]
