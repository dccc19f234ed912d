"""The one exception the config package raises, and helpers that word its messages."""
from __future__ import annotations

import difflib
from typing import Any, Iterable


class ConfigError(ValueError):
    """A config key is unknown, or its value is mistyped, out of range or inconsistent.

    Every message names the dotted key (``strategy.tp``), the offending value and what
    would be valid, so it can be fixed without reading the source.
    """


def show(value: Any, limit: int = 60) -> str:
    """repr() of a value, cut short so a whole mapping never floods a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def suggest(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """' (did you mean X?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""
