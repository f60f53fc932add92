"""Building typed dataclass configs from plain dicts (YAML sections), with errors that name the key.

Every config in the project (`quant:`, `data:`, `train:` ...) goes through :func:`from_dict`, so an
unknown key or a value of the wrong type fails at load time as ``section.key: ...`` instead of deep
inside a run.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar, Union

T = TypeVar("T")


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and (not args or all(_matches(v, args[0]) for v in value))
    if origin is dict:
        args = typing.get_args(tp)
        return isinstance(value, dict) and (not args or all(
            _matches(k, args[0]) and _matches(v, args[1]) for k, v in value.items()))
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    """``int``, ``list[str] | null``, ``dict[str, float]``: how a type reads in a YAML error."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is not None:
        args = typing.get_args(tp)
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    """The YAML-side type of a value: ``str``, ``null``, ``list[int]``."""
    if value is None:
        return "null"
    if isinstance(value, list):
        inner = sorted({type(v).__name__ for v in value})
        return f"list[{' | '.join(inner)}]" if inner else "list"
    return type(value).__name__


def check_type(key: str, value: Any, tp: Any) -> None:
    """ValueError ``key: expected <type>, got <type> (<value>)`` unless ``value`` is a ``tp``."""
    if not _matches(value, tp):
        raise ValueError(f"{key}: expected {_type_name(tp)}, got {_describe(value)} ({value!r})")


def check_fields(obj: Any, section: str) -> None:
    """Type-check every field of dataclass instance ``obj`` (for ``__post_init__``: direct construction
    is checked like loading from YAML)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        check_type(f"{section}.{f.name}", getattr(obj, f.name), hints[f.name])


def from_dict(cls: type[T], data: dict[str, Any] | None, section: str) -> T:
    """Build dataclass ``cls`` from ``data``; ValueError naming ``section.key`` on any mismatch.

    Nested dataclass fields are built recursively; ``__post_init__`` validation still runs.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"{section}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{section}.{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for key, value in data.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            kwargs[key] = from_dict(tp, value, f"{section}.{key}")
            continue
        check_type(f"{section}.{key}", value, tp)
        if tp is float or float in typing.get_args(tp):
            value = float(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if isinstance(value, tuple):
            value = list(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(section) else f"{section}.{msg}") from None


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (for saving next to checkpoints)."""
    return dataclasses.asdict(obj)
