"""One registry shape for every family: codecs, compressors, merge methods, routers, zoo tasks, ...

A ``Registry`` is a read-only mapping filled once per name by its family's
decorator (``registry.register(name, options=Model)``); registering a name
twice is an error, and a lookup miss raises :class:`UnknownNameError` whose
message lists the known names.

Every member has a typed options model (a frozen pydantic :class:`Options`
with bounds; :class:`NoOptions` when it takes none). ``parse_options`` is the
one place user-supplied options (CLI flags, HTTP bodies, recipe strings) are
checked: an unknown option is refused with the list of valid ones, a bad value
with the field and the bound. ``describe`` feeds the CLI help, ``deltaserve
methods`` and the docs' Methods page.

A family kept as a package (one file per member: ``experts/codecs/``,
``experts/merge/``) names it with ``package=``: the first lookup imports every
module of that package, so a new member is one new file and no list of
members exists anywhere else.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T")


class UnknownNameError(KeyError, ValueError):
    """A registry lookup missed. A KeyError for mapping use, a ValueError for input
    validation (HTTP layers map it to 4xx); ``str()`` is the plain message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class OptionsError(ValueError):
    """Options for a registered member are unknown or out of bounds; ``param`` names the first bad one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Options(BaseModel):
    """Base of every member's options: frozen, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoOptions(Options):
    pass


class Registry(Mapping[str, T]):
    def __init__(self, kind: str, plural: str | None = None, *, package: str | None = None):
        self.kind = kind
        self.plural = plural or f"{kind}s"
        self.package = package
        self._items: dict[str, T] = {}
        self._options: dict[str, type[Options]] = {}
        self._discovered = package is None

    def discover(self) -> None:
        """Import every module of ``package`` (once; their decorators register the members)."""
        if self._discovered or self.package is None:   # no package: _discovered is always True
            return
        self._discovered = True
        package = importlib.import_module(self.package)
        for module in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
            importlib.import_module(f"{self.package}.{module.name}")

    def rediscover(self) -> None:
        """Look at the package's modules again (a module added since): members already registered stay."""
        self._discovered = self.package is None
        self.discover()

    def add(self, name: str, item: T, options: type[Options] = NoOptions) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        if not (isinstance(options, type) and issubclass(options, Options)):
            raise TypeError(f"{self.kind} {name!r}: options must be an experts.registry.Options subclass")
        self._items[name] = item
        self._options[name] = options
        return item

    def unregister(self, name: str) -> T:
        """Remove ``name`` (a plugin unloaded, a test's throwaway member); a miss lists the known names."""
        item = self[name]
        del self._items[name], self._options[name]
        return item

    def register(self, name: str, options: type[Options] = NoOptions) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` with its options model."""

        def decorate(item: T) -> T:
            return self.add(name, item, options)

        return decorate

    def __getitem__(self, name: str) -> T:
        self.discover()
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; "
                                   f"known {self.plural}: {sorted(self._items)}") from None

    def options_model(self, name: str) -> type[Options]:
        self[name]  # a miss lists the known names
        return self._options[name]

    def parse_options(self, name: str, raw: Mapping[str, Any] | Options | None = None) -> Options:
        """``raw`` validated against ``name``'s options model (defaults filled in)."""
        model = self.options_model(name)
        if isinstance(raw, model):
            return raw
        raw = dict(raw.model_dump() if isinstance(raw, BaseModel) else raw or {})
        unknown = sorted(set(raw) - set(model.model_fields))
        if unknown:
            raise OptionsError(f"unknown option(s) {unknown} for {self.kind} {name!r}; valid options: "
                               f"{sorted(model.model_fields) or 'none'}", unknown[0])
        try:
            return model.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or None
            problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in err.errors())
            raise OptionsError(f"invalid options for {self.kind} {name!r}: {problems}", where) from None

    def describe(self) -> list[dict[str, Any]]:
        """Every member with its options: ``[{"name", "options": [{"name", "type", "default", "doc"}]}]``."""
        self.discover()
        rows = []
        for name in sorted(self._items):
            fields = []
            for field, info in self._options[name].model_fields.items():
                bounds = [f"{op} {getattr(m, op)}" for m in info.metadata for op in ("gt", "ge", "lt", "le")
                          if getattr(m, op, None) is not None]
                fields.append({"name": field, "type": _type_name(info.annotation), "default": info.default,
                               "doc": info.description or "", "bounds": ", ".join(bounds)})
            item = self._items[name]
            doc = (getattr(item, "doc", None) or getattr(item, "__doc__", None) or "").strip().splitlines()
            rows.append({"name": name, "doc": doc[0] if doc else "", "options": fields})
        return rows

    def __iter__(self) -> Iterator[str]:
        self.discover()
        return iter(self._items)

    def __len__(self) -> int:
        self.discover()
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        self.discover()
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self)})"


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) or str(annotation)
    return text.replace("typing.", "").replace("Literal", "one of ")
