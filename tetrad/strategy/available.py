"""Which candidates this build can run: asked of the engine at its edge, never re-implemented.

The engine rejects strategy keys whose implementation has not landed with a ConfigError saying
"not available in this build"; a candidate it rejects is pruned with that message as the
reason. When the engine has no such check (everything landed), every candidate is available.
"""

from __future__ import annotations

from tetrad.config import ConfigError, StrategyConfig


def unavailable_reason(s: StrategyConfig) -> str | None:
    """The engine's own words if it would refuse ``s`` as not built yet, else None."""
    try:
        from tetrad.trainer import engine
    except ImportError as err:  # a partial checkout: nothing can be verified
        return f"the engine is not importable: {err}"
    check = getattr(engine, "_check_supported", None)
    if check is None:
        return None
    try:
        check(s)
    except ConfigError as err:
        return str(err)
    except (NotImplementedError, ImportError) as err:
        return f"not available in this build: {err}"
    return None
