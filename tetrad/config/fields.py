"""Per-field checking: a value against its type hint and its bounds, and mapping -> dataclass.

The schema declares each field with :func:`setting`, which stores its one-line doc and its
bounds in the dataclass field's metadata; everything here reads those, so adding a field
to the schema needs no code in this file.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Literal, Union

from tetrad.config.errors import ConfigError, show, suggest

Check = Callable[[Any], "str | None"]


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Callable[[], Any] | None = None,
            ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, check: Check | None = None, key: str | None = None) -> Any:
    """A dataclass field with a doc line and bounds; `key` is its YAML name when it differs.

    Bounds apply to numbers, and to every element of a tuple; `check` returns an
    explanation of what is valid when the value is not, else None.
    """
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "check": check, "key": key}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def yaml_key(f: dataclasses.Field) -> str:
    """The name a field has in YAML (``async`` for ``async_save``)."""
    return f.metadata.get("key") or f.name


def yaml_fields(cls: type) -> dict[str, dataclasses.Field]:
    """YAML key -> field, for the fields a user may set."""
    return {yaml_key(f): f for f in dataclasses.fields(cls) if f.init}


def hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a dataclass (its annotations are strings)."""
    return typing.get_type_hints(cls)


def section_type(hint: Any) -> type | None:
    """The dataclass a hint names (through Optional), or None for a leaf field."""
    for arg in (hint, *typing.get_args(hint)):
        if isinstance(arg, type) and dataclasses.is_dataclass(arg):
            return arg
    return None


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def unknown_key(path: str, key: str, value: Any, known: Iterable[str],
                elsewhere: str | None = None) -> ConfigError:
    """The error for a key the schema does not have, with a did-you-mean.

    `elsewhere` is the dotted key where this name does exist (``run.global_batch_size``
    written under ``strategy``), which beats any spelling guess.
    """
    known = list(known)
    hint = f" (did you mean {elsewhere!r}?)" if elsewhere else suggest(key, known, prefix=join(path, ""))
    where = f"section {path!r}" if path else "the top level"
    return ConfigError(f"unknown key {join(path, key)!r} (= {show(value)}){hint}; "
                       f"valid keys in {where}: {', '.join(known)}")


def replaced_key(cls: type, path: str, key: str, value: Any) -> ConfigError | None:
    """The error for a key a section no longer has because another replaced it
    (``REPLACED = {old: (new key, value -> new value)}`` on the section class), else None."""
    entry = getattr(cls, "REPLACED", {}).get(key)
    if entry is None:
        return None
    new, translate = entry
    return ConfigError(f"{join(path, key)}={show(value)} is no longer a key: it was replaced by "
                       f"{join(path, new)}; write {new}: {show(translate(value))}")


# --- type descriptions and conversion -----------------------------------------------------

def describe(hint: Any) -> str:
    """Plain-words description of what a type hint accepts, for error messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else describe(a) for a in args)
    if origin is tuple and args[-1:] == (Ellipsis,):
        return "a list of " + {int: "integers", float: "numbers"}.get(args[0], "values")
    if origin is tuple:
        return f"a list of {len(args)} " + ("numbers" if all(a is float for a in args) else "values")
    if dataclasses.is_dataclass(hint):
        return "a mapping with keys " + ", ".join(yaml_fields(hint))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _leaf(value: Any, hint: Any) -> Any:
    """Convert one scalar to `hint`; raise TypeError when it cannot be, without widening."""
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif typing.get_origin(hint) is Literal:
        ok = any(type(value) is type(a) and value == a for a in typing.get_args(hint))
    else:
        raise TypeError(f"unsupported field type {hint!r}")
    if not ok:
        raise TypeError
    return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def convert(value: Any, hint: Any, path: str) -> Any:
    """`value` checked against `hint` (ints widen to floats, lists become tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if origin in (Union, types.UnionType):
            return _union(value, args, path)
        if origin is tuple and args[-1:] == (Ellipsis,):  # tuple[X, ...]: any length
            if not isinstance(value, (list, tuple)):
                raise TypeError
            return tuple(convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        if origin is tuple:
            if not isinstance(value, (list, tuple)) or len(value) != len(args):
                raise TypeError
            return tuple(convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        if dataclasses.is_dataclass(hint):
            return value if isinstance(value, hint) else build(hint, value, path)
        return _leaf(value, hint)
    except TypeError:
        raise ConfigError(f"{path}={show(value)}: expected {describe(hint)}, "
                          f"got {_type_name(value)}") from None


def _union(value: Any, args: tuple, path: str) -> Any:
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return convert(value, arg, path)
        except ConfigError:
            pass
    raise TypeError


# --- bounds --------------------------------------------------------------------------------

_BOUNDS = (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
           ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b))


def bounds_text(meta: Mapping[str, Any]) -> str:
    """'>= 1 and <= 4096' for a field's bounds."""
    return " and ".join(f"{sym} {meta[name]}" for name, sym, _ in _BOUNDS if meta.get(name) is not None)


def check_bounds(value: Any, meta: Mapping[str, Any], path: str) -> None:
    """Raise when a number (or any number inside a tuple) breaks the field's bounds."""
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            continue
        if not all(ok(item, meta[name]) for name, _, ok in _BOUNDS if meta.get(name) is not None):
            each = "each element " if isinstance(value, tuple) else ""
            raise ConfigError(f"{path}={show(value)}: out of range; valid: {each}{bounds_text(meta)}")
    check = meta.get("check")
    valid = check(value) if check is not None and value is not None else None
    if valid:
        raise ConfigError(f"{path}={show(value)}: invalid; valid: {valid}")


def check_field(value: Any, f: dataclasses.Field, hint: Any, path: str) -> Any:
    """Type-convert then bound-check one field's value; returns the converted value."""
    value = convert(value, hint, path)
    if not dataclasses.is_dataclass(value):
        check_bounds(value, f.metadata, path)
    return value


# --- mapping -> dataclass ------------------------------------------------------------------

def build(cls: type, raw: Any, path: str = "") -> Any:
    """Instantiate `cls` from a mapping, strictly: unknown keys and bad values raise.

    A section written as null (a YAML key with nothing under it) takes its defaults; a
    class may map scalar spellings to mappings via ``SCALAR_FORMS`` (``strategy: auto``).
    """
    if raw is None:
        raw = {}
    raw = getattr(cls, "SCALAR_FORMS", {}).get(raw, raw) if isinstance(raw, str) else raw
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path or 'config'}={show(raw)}: expected {describe(cls)}")
    known, types_ = yaml_fields(cls), hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in known:
            raise replaced_key(cls, path, str(key), value) or unknown_key(path, str(key), value, known)
        f = known[key]
        kwargs[f.name] = check_field(value, f, types_[f.name], join(path, key))
    obj = cls(**kwargs)
    if "given" in {f.name for f in dataclasses.fields(cls)}:
        obj.given = frozenset(_given(raw))
    return obj


def _given(raw: Mapping, prefix: str = "") -> list[str]:
    """Dotted keys present in a raw mapping, nested mappings included."""
    keys = []
    for key, value in raw.items():
        # A nested mapping fixes only the keys written inside it.
        keys += _given(value, f"{prefix}{key}.") if isinstance(value, Mapping) else [prefix + key]
    return keys


def check_instance(obj: Any, path: str = "") -> None:
    """Re-check every field of an already built dataclass (e.g. one made in Python)."""
    types_ = hints(type(obj))
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        sub = join(path, yaml_key(f))
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_instance(value, sub)
        else:
            check_field(value, f, types_[f.name], sub)
