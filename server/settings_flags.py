"""Command-line flags and ``DELTASERVE_*`` environment variables generated from the settings models.

Every field of :class:`~deltaserve.server.settings.ServerSettings` (and of the
models it nests) is one flag: ``--<field-name>`` unless its ``cli(...)``
metadata names another, its help and default from the field, its type and
choices from the annotation. A flag not given falls back to the environment
variable ``DELTASERVE_<FLAG>`` (``--max-wait-ms`` -> ``DELTASERVE_MAX_WAIT_MS``;
repeated flags and KEY=VALUE flags take comma-separated lists there, added to
the flags), then to the model's default. Kinds: ``value``; ``onoff`` (a bool as
``on``/``off``); ``switch`` (a bool set by the flag alone); ``repeat`` (a list,
one value per flag); ``keyvalue`` (a dict or a nested model as ``KEY=VALUE``
pairs); ``flatten`` (a nested model whose fields are flags of their own).
"""

from __future__ import annotations

import argparse
import os
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

ENV_PREFIX = "DELTASERVE_"
FlagKind = Literal["value", "onoff", "switch", "repeat", "keyvalue", "flatten"]
_UNSET = object()


def cli(flag: str | None = None, kind: FlagKind = "value", *, required: bool = False) -> dict[str, Any]:
    """A field's command-line metadata (``json_schema_extra=cli(...)``): its flag and how it is given."""
    return {"cli": {"flag": flag, "kind": kind, "required": required}}


@dataclass(frozen=True)
class Flag:
    path: tuple[str, ...]          # the field's place in the settings, e.g. ("engine", "max_wait_ms")
    flag: str                      # e.g. "--max-wait-ms"
    kind: FlagKind
    field: FieldInfo
    required: bool = False
    keys: tuple[str, ...] = ()     # keyvalue over a nested model: the keys it takes

    @property
    def dest(self) -> str:
        return "setting__" + "__".join(self.path)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.flag.lstrip("-").replace("-", "_").upper()


def _meta(field: FieldInfo) -> dict[str, Any]:
    extra: dict[str, Any] = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return dict(extra.get("cli") or {})


def flags(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> Iterator[Flag]:
    """Every flag of ``model``'s fields (nested ``flatten`` models walked; a ``keyvalue`` model's fields
    that name a flag of their own are flags too, and the rest are its keys)."""
    for name, field in model.model_fields.items():
        meta = _meta(field)
        kind, path = meta.get("kind", "value"), (*prefix, name)
        flag = meta.get("flag") or "--" + name.replace("_", "-")
        nested = _model_of(field.annotation)
        if kind == "flatten" and nested is not None:
            yield from flags(nested, path)
            continue
        keys: tuple[str, ...] = ()
        if kind == "keyvalue" and nested is not None:
            own = list(flags_of_own(nested, path))
            yield from own
            keys = tuple(n for n in nested.model_fields if (*path, n) not in {f.path for f in own})
        yield Flag(path, flag, kind, field, bool(meta.get("required")), keys)


def flags_of_own(model: type[BaseModel], prefix: tuple[str, ...]) -> Iterator[Flag]:
    for name, field in model.model_fields.items():
        meta = _meta(field)
        if meta.get("flag"):
            yield Flag((*prefix, name), meta["flag"], meta.get("kind", "value"), field, bool(meta.get("required")))


def _model_of(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _converter(annotation: Any) -> tuple[Any, list[Any] | None]:
    """(argparse type, choices) for a field annotation (Optional unwrapped; int | Literal['auto'] as either)."""
    origin, args = typing.get_origin(annotation), [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is Literal:
        return type(args[0]), list(args)
    if origin in (typing.Union, types.UnionType):
        literals = [a for a in args if typing.get_origin(a) is Literal]
        plain = [a for a in args if typing.get_origin(a) is not Literal]
        if literals and plain:
            words = [w for lit in literals for w in typing.get_args(lit)]
            inner, _ = _converter(plain[0])
            return (lambda text: text if text in words else inner(text)), None
        return _converter(args[0])
    if origin is list:
        return _converter(args[0])
    return (annotation if annotation in (int, float, str, Path) else str), None


def _help(flag: Flag, default: Any) -> str:
    text = flag.field.description or ""
    if flag.keys:
        text += f" (keys: {', '.join(flag.keys)})"
    shown = default if default is not _UNSET else flag.field.get_default(call_default_factory=True)
    if flag.kind == "onoff":
        shown = "on" if shown else "off"
    if flag.kind in ("value", "onoff") and not flag.required and shown not in (None, ""):
        text += f" [default: {shown}]"
    return f"{text} (env {flag.env})".replace("%", "%%")


def add_settings_flags(parser: argparse.ArgumentParser, model: type[BaseModel], *,
                       defaults: Mapping[tuple[str, ...], Any] | None = None,
                       exclude: tuple[tuple[str, ...], ...] = ()) -> list[Flag]:
    """Add one flag per field of ``model`` to ``parser``; ``defaults`` replace a field's default for this
    command (e.g. the demo's router), ``exclude`` leaves fields the command sets itself. Returns the flags."""
    added = []
    for flag in flags(model):
        if flag.path in exclude:
            continue
        default = (defaults or {}).get(flag.path, _UNSET)
        kwargs: dict[str, Any] = {"dest": flag.dest, "help": _help(flag, default), "default": None}
        if flag.kind == "switch":
            kwargs.update(action="store_true", default=None)
        elif flag.kind == "onoff":
            kwargs.update(choices=["on", "off"])
        elif flag.kind in ("repeat", "keyvalue"):
            kwargs.update(action="append", metavar="KEY=VALUE" if flag.kind == "keyvalue" else None)
            kwargs["type"] = _converter(flag.field.annotation)[0] if flag.kind == "repeat" else str
        else:
            kwargs["type"], kwargs["choices"] = _converter(flag.field.annotation)
        if flag.kind in ("value", "repeat") and not kwargs.get("choices"):
            kwargs["metavar"] = flag.path[-1].upper()
        if flag.required and default is _UNSET:
            kwargs["required"] = not os.environ.get(flag.env)
        parser.add_argument(flag.flag, **kwargs)
        parser.set_defaults(**{f"default__{flag.dest}": default})
        added.append(flag)
    return added


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"error: {flag} {item!r} must be KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _value(flag: Flag, args: argparse.Namespace, environ: Mapping[str, str]) -> Any:
    given = getattr(args, flag.dest, None)
    env = environ.get(flag.env)
    if flag.kind in ("repeat", "keyvalue"):
        items = list(given or []) + [v.strip() for v in (env or "").split(",") if v.strip()]
        if not items:
            return getattr(args, f"default__{flag.dest}", _UNSET)
        return _pairs(items, flag.flag) if flag.kind == "keyvalue" else items
    if given is None and env is not None:
        given = env if flag.kind != "switch" else env.lower() in ("1", "true", "yes", "on")
    if given is None:
        return getattr(args, f"default__{flag.dest}", _UNSET)
    return given == "on" if flag.kind == "onoff" else given


def settings_from_args(model: type[BaseModel], args: argparse.Namespace, added: list[Flag], *,
                       environ: Mapping[str, str] | None = None, **fixed: Any) -> Any:
    """The settings the flags (then environment, then defaults) give; ``fixed`` sets fields by path
    (``engine__base_dir=...``). A bad value exits naming its flag."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    for flag in added:
        value = _value(flag, args, environ)
        if value is not _UNSET:
            _put(data, flag.path, value, merge=flag.kind == "keyvalue")
    for key, value in fixed.items():
        _put(data, tuple(key.split("__")), value)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = tuple(str(p) for p in first.get("loc", ()))
        owner = next((f.flag for f in added if f.path == where[:len(f.path)]), None)
        raise SystemExit(f"error: {owner + ': ' if owner else ''}{first['msg']}") from None


def _put(data: dict[str, Any], path: tuple[str, ...], value: Any, merge: bool = False) -> None:
    for part in path[:-1]:
        data = data.setdefault(part, {})
    if merge and isinstance(data.get(path[-1]), dict):
        data[path[-1]].update(value)
    else:
        data[path[-1]] = value
