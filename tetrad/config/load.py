"""Reading configs: YAML files or dicts, `--set section.key=value` overrides, strictly."""
from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from tetrad.config.errors import ConfigError, show
from tetrad.config.fields import build, hints, replaced_key, section_type, unknown_key, yaml_fields
from tetrad.config.schema import Config, StrategyConfig


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `3e-4` as a float (PyYAML wants `3.0e-4`, YAML 1.2 does not)
    and refuses a key given twice in one mapping (PyYAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, origin: str) -> Any:
    """Safe-load YAML text; a syntax error names `origin` and the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"{origin}: malformed YAML{where}: {problem}") from None


def read_yaml(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise ConfigError(f"config file {os.fspath(path)!r}: cannot read ({e.strerror}); "
                          "valid: a path to a YAML file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {os.fspath(path)!r}: not UTF-8 text (byte {e.start}); "
                          "valid: a YAML file") from None
    return parse_yaml(text, os.fspath(path))


def _raw(source: Any) -> tuple[Any, str]:
    """(raw mapping, name for messages) from a path or a mapping; the mapping is a copy."""
    if isinstance(source, Mapping):
        return copy.deepcopy(dict(source)), "config"
    if isinstance(source, (str, os.PathLike)):
        return read_yaml(source), os.fspath(source)
    raise ConfigError(f"config source={show(source)}: expected a YAML path or a mapping")


def _top_mapping(raw: Any, origin: str) -> dict:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{origin}: top level={show(raw)}: expected a mapping of sections "
                          f"({', '.join(yaml_fields(Config))})")
    return dict(raw)


# --- keys written in the wrong section ---------------------------------------------------

def misplaced(path: str, key: str) -> str | None:
    """Where `key` lives if it is a key of another top-level section, e.g. 'run.global_batch_size'."""
    if "." in path:
        return None
    for section, f in yaml_fields(Config).items():
        if section != path and key in yaml_fields(hints(Config)[f.name]):
            return f"{section}.{key}"
    return None


def _check_section_keys(path: str, raw: Any) -> None:
    """An unknown key of a top-level section that another section has fails with that hint
    ('did you mean run.global_batch_size?'), before the strict build sees it."""
    if not isinstance(raw, Mapping):
        return
    known = yaml_fields(section_type(hints(Config)[yaml_fields(Config)[path].name]))
    for key, value in raw.items():
        if key not in known and misplaced(path, str(key)):
            raise unknown_key(path, str(key), value, known, misplaced(path, str(key)))


def _check_misplaced(raw: Mapping) -> None:
    for section, value in raw.items():
        if section in yaml_fields(Config):
            _check_section_keys(section, value)


# --- overrides -----------------------------------------------------------------------------

def _check_path(parts: list[str], text: str, value: Any) -> None:
    """Raise unless `parts` names a field of Config (a section or a key inside one)."""
    cls: type | None = Config
    for i, part in enumerate(parts):
        if cls is None:
            raise ConfigError(f"--set {text!r}: {'.'.join(parts[:i])} is a value, not a section")
        known = yaml_fields(cls)
        if part not in known:
            path = ".".join(parts[:i])
            err = replaced_key(cls, path, part, value) or unknown_key(path, part, value, known,
                                                                       misplaced(path, part))
            raise ConfigError(f"--set {text!r}: {err}") from None
        cls = section_type(hints(cls)[known[part].name])


def apply_override(raw: dict, text: str) -> None:
    """Set `section.key=value` in a raw config mapping; the value is parsed as YAML."""
    key, sep, value_text = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. strategy.tp=2")
    value = parse_yaml(value_text, f"--set {text!r}")
    _check_path(parts, text, value)
    node, cls = raw, Config
    for part in parts[:-1]:
        cls = section_type(hints(cls)[yaml_fields(cls)[part].name])
        child = node.get(part)
        if isinstance(child, str):  # e.g. `strategy: auto` before `--set strategy.tp=2`
            child = getattr(cls, "SCALAR_FORMS", {}).get(child, child)
        if child is None:
            child = {}
        elif not isinstance(child, Mapping):
            raise ConfigError(f"--set {text!r}: {part}={show(child)} is not a mapping to set a key in")
        node[part] = node = dict(child)
    node[parts[-1]] = value


# --- entry points --------------------------------------------------------------------------

def load_config(source: Any, overrides: Sequence[str] = (), world_size: int | None = None) -> Config:
    """A validated Config from a YAML path or a mapping, with `section.key=value` overrides.

    With `world_size`, the layout is checked against it too (unless strategy.auto).
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    raw, origin = _raw(source)
    raw = _top_mapping(raw, origin)
    for text in overrides:
        apply_override(raw, text)
    try:
        _check_misplaced(raw)
        cfg = build(Config, raw)
        cfg.validate(world_size)
    except ConfigError as e:
        raise (ConfigError(f"{origin}: {e}") if origin != "config" else e) from None
    return cfg


def load_strategy(source: Any) -> StrategyConfig:
    """A validated StrategyConfig from a YAML path, a mapping, "auto", or a StrategyConfig.

    The YAML's top level is the strategy mapping itself, or has a `strategy:` key (so a
    whole run config works too; its other sections are ignored).
    """
    if isinstance(source, StrategyConfig):
        source.validate()
        return source
    if isinstance(source, str) and source == "auto":
        raw, origin = "auto", "strategy"
    else:
        raw, origin = _raw(source)
    if isinstance(raw, Mapping) and "strategy" in raw:
        raw = raw["strategy"]
    try:
        _check_section_keys("strategy", raw)
        strategy = build(StrategyConfig, raw, "strategy")
        strategy.validate()
    except ConfigError as e:
        raise (ConfigError(f"{origin}: {e}") if origin not in ("config", "strategy") else e) from None
    return strategy
