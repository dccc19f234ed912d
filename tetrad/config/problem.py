"""A rule book message (``Problem``) and the helpers every part of the rule book writes with.

Their own module so that the rule book's parts (``tetrad.config.validate``, and the sharding
rules in ``tetrad.config.sharding_rules``) share them without importing each other in a cycle.
"""

from __future__ import annotations

from tetrad.config.errors import ConfigError


class Problem(str):
    """A rule book message; ``rule`` names the rule it breaks (e.g. ``offload.params_zero3``)."""

    rule: str

    def __new__(cls, rule: str, message: str) -> "Problem":
        obj = super().__new__(cls, message)
        obj.rule = rule
        return obj


def divisors(n: int, limit: int = 8) -> str:
    """'1, 2, 4, 8' — the divisors of n (the first `limit` of them)."""
    divs = [d for d in range(1, n + 1) if n % d == 0]
    return ", ".join(map(str, divs[:limit])) + (", ..." if len(divs) > limit else "")


def rules(table: list[tuple[str, bool, str]]) -> list[Problem]:
    return [Problem(rule, message) for rule, broken, message in table if broken]


def raise_all(errors: list[str]) -> None:
    """Raise one ConfigError listing every message, if there are any."""
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} config problems:\n- " + "\n- ".join(errors))
