"""The one exception the config package raises, and helpers that word its messages."""
from __future__ import annotations

import difflib
import reprlib
from typing import Any, Iterable


class ConfigError(ValueError):
    """A config key is unknown, or its value is mistyped, out of range or inconsistent.

    Every message names the dotted key (``strategy.tp``), the offending value and what
    would be valid, so it can be fixed without reading the source.
    """


_SHORT = reprlib.Repr()  # keyword arguments only from Python 3.12
_SHORT.maxlevel, _SHORT.maxlist, _SHORT.maxtuple, _SHORT.maxdict = 3, 6, 6, 6
_SHORT.maxstring = _SHORT.maxother = 60


def show(value: Any, limit: int = 60) -> str:
    """repr() of a value, cut short so a whole mapping never floods a message (reprlib stops
    early: a YAML alias bomb shares one list a billion times and a full repr never ends)."""
    text = _SHORT.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def suggest(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """' (did you mean X?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {prefix + close[0]!r}?)" if close else ""
