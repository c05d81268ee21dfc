"""One typed-config engine: parsed YAML (dicts, lists, scalars) -> nested dataclasses, and back.

:func:`build` turns a mapping into an instance of a dataclass, field by field, converting each value to
the field's annotation (:func:`coerce`):

* ``int`` accepts integers and integral floats or numeric strings (``1e6``, ``2.5e5`` and ``1_000``,
  which YAML 1.1 reads as strings, become ints); ``float`` accepts numbers and numeric strings;
  ``bool`` and ``str`` accept only themselves;
* ``X | None`` accepts null; other unions try their members in order;
* ``Literal[...]`` accepts one of its values (the error suggests the closest);
* ``tuple[...]`` (fixed length), ``list[X]`` and ``dict[str, X]`` are converted element by element;
* a nested dataclass (alone or inside a list) is built recursively from a mapping.

Unknown keys are errors that suggest the closest valid dotted key; missing fields without a default are
errors too. Every error is a :class:`ConfigError` (or the subclass a caller passes) naming the dotted key
(``optim.lr``, ``arms[2].overrides``). :func:`to_dict` is the inverse: a plain nested dict (tuples become
lists) ready for YAML or JSON.

This module imports nothing from deltafm; :mod:`deltafm.train.config` and :mod:`deltafm.study.spec` use it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from deltafm.errors import UserError

__all__ = [
    "read_yaml",
    "ConfigError",
    "build",
    "coerce",
    "dotted_keys",
    "field_names",
    "to_dict",
    "type_name",
    "unknown_key_error",
]


class ConfigError(UserError, ValueError):
    """A config key or value is invalid; the message names the dotted key."""


@dataclass(frozen=True)
class _Ctx:
    """How errors are raised: the exception class and the noun that precedes a key in messages."""

    error: type[ConfigError] = ConfigError
    noun: str = "config key"

    def fail(self, key: str, msg: str) -> ConfigError:
        return self.error(f"{self.noun} '{key}' {msg}")


# ----------------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------------


def field_names(cls: type) -> list[str]:
    """The field names of dataclass ``cls``."""
    return [f.name for f in dataclasses.fields(cls)]


def dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every leaf key of dataclass ``cls`` as a dotted path (nested dataclass fields expanded)."""
    out: list[str] = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out.extend(dotted_keys(hints[f.name], key + "."))
        else:
            out.append(key)
    return out


def unknown_key_error(key: str, valid: list[str], *, error: type[ConfigError] = ConfigError,
                      noun: str = "config key") -> ConfigError:
    """The error for an unknown ``key``, suggesting the closest of ``valid`` (whole key, then last part)."""
    leaf = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:
        by_leaf = {v.rsplit(".", 1)[-1]: v for v in valid}
        close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return error(f"unknown {noun} '{key}'{hint}")


def type_name(tp: Any) -> str:
    """Readable name of an annotation (``'a' | 'b'`` for a Literal)."""
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


# ----------------------------------------------------------------------------------------------------
# Values
# ----------------------------------------------------------------------------------------------------


def _bool(value: Any, key: str, ctx: _Ctx) -> bool:
    if isinstance(value, bool):
        return value
    raise ctx.fail(key, f"must be true or false, got {value!r}")


def _int(value: Any, key: str, ctx: _Ctx) -> int:
    if isinstance(value, bool):
        raise ctx.fail(key, f"must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            value = float(value.replace("_", ""))
        except ValueError:
            raise ctx.fail(key, f"must be an integer, got {value!r}") from None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise ctx.fail(key, f"must be an integer, got {value!r}")


def _float(value: Any, key: str, ctx: _Ctx) -> float:
    if isinstance(value, bool):
        raise ctx.fail(key, f"must be a number, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise ctx.fail(key, f"must be a number, got {value!r}")


def _str(value: Any, key: str, ctx: _Ctx) -> str:
    if isinstance(value, str):
        return value
    raise ctx.fail(key, f"must be a string, got {value!r}")


_SCALARS: dict[Any, Callable[[Any, str, _Ctx], Any]] = {bool: _bool, int: _int, float: _float, str: _str}


def _union(value: Any, tp: Any, key: str, ctx: _Ctx) -> Any:
    args = get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ctx.fail(key, "may not be null")
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key, ctx)
        except ConfigError as e:
            errors.append(str(e))
    kinds = " or ".join(type_name(a) for a in args if a is not type(None))
    raise ctx.error(errors[0] if len(errors) == 1 else f"{ctx.noun} '{key}' must be {kinds}, got {value!r}")


def _literal(value: Any, tp: Any, key: str, ctx: _Ctx) -> Any:
    choices = get_args(tp)
    if value in choices:
        return value
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ctx.fail(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}{hint}")


def _tuple(value: Any, tp: Any, key: str, ctx: _Ctx) -> tuple:
    args = get_args(tp)
    if not isinstance(value, list | tuple) or len(value) != len(args):
        raise ctx.fail(key, f"must be a list of {len(args)} values, got {value!r}")
    return tuple(_coerce(v, a, f"{key}[{i}]", ctx) for i, (v, a) in enumerate(zip(value, args)))


def _list(value: Any, tp: Any, key: str, ctx: _Ctx) -> list:
    (arg,) = get_args(tp)
    if not isinstance(value, list | tuple):
        raise ctx.fail(key, f"must be a list, got {value!r}")
    return [_coerce(v, arg, f"{key}[{i}]", ctx) for i, v in enumerate(value)]


def _dict(value: Any, tp: Any, key: str, ctx: _Ctx) -> dict:
    if not isinstance(value, dict):
        raise ctx.fail(key, f"must be a mapping, got {value!r}")
    for k in value:
        if not isinstance(k, str):
            raise ctx.fail(key, f"has a non-string key {k!r}")
    return dict(value)


_CONTAINERS: dict[Any, Callable[[Any, Any, str, _Ctx], Any]] = {
    Union: _union, types.UnionType: _union, Literal: _literal, tuple: _tuple, list: _list, dict: _dict,
}


def _coerce(value: Any, tp: Any, key: str, ctx: _Ctx) -> Any:
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ctx.fail(key, f"must be a mapping, got {value!r}")
        return _build(tp, value, key + ".", ctx)
    if tp in _SCALARS:
        return _SCALARS[tp](value, key, ctx)
    handler = _CONTAINERS.get(get_origin(tp))
    if handler is None:  # pragma: no cover - a field type this engine does not know
        raise ctx.error(f"{ctx.noun} '{key}': unsupported type {type_name(tp)}")
    return handler(value, tp, key, ctx)


def coerce(value: Any, tp: Any, key: str, *, error: type[ConfigError] = ConfigError,
           noun: str = "config key") -> Any:
    """Convert a parsed YAML value to annotation ``tp`` (see the module docstring), or raise ``error``
    naming ``key``."""
    return _coerce(value, tp, key, _Ctx(error, noun))


# ----------------------------------------------------------------------------------------------------
# Dataclasses
# ----------------------------------------------------------------------------------------------------


def _build(cls: type, data: dict[str, Any], prefix: str, ctx: _Ctx) -> Any:
    hints = get_type_hints(cls)
    valid = field_names(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in valid:
            raise unknown_key_error(f"{prefix}{k}", [f"{prefix}{n}" for n in dotted_keys(cls)],
                                    error=ctx.error, noun=ctx.noun)
        kwargs[k] = _coerce(v, hints[k], f"{prefix}{k}", ctx)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ctx.fail(f"{prefix}{f.name}", "is required")
    return cls(**kwargs)


def build(cls: type, data: dict[str, Any], prefix: str = "", *, error: type[ConfigError] = ConfigError,
          noun: str = "config key") -> Any:
    """Instance of dataclass ``cls`` from mapping ``data`` (missing keys take the defaults); keys in
    messages are prefixed with ``prefix``; errors are ``error`` and say ``unknown <noun> 'key'``."""
    ctx = _Ctx(error, noun)
    if not isinstance(data, dict):
        raise ctx.error(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {data!r}")
    return _build(cls, data, prefix, ctx)


def read_yaml(path: str | os.PathLike, *, error: type[ConfigError] = ConfigError, what: str = "config"
              ) -> dict[str, Any]:
    """The mapping in a YAML file (an empty file is ``{}``); ``error`` naming the file when it is missing,
    does not parse, or holds something other than a mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(f"cannot parse {what} {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} {path} must be a mapping, got {type(data).__name__}")
    return data


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dict of a dataclass instance (tuples become lists), suitable for YAML or JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(obj))
