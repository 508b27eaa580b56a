"""Recipes: what the `model` field of a request asks the engine to serve.

A recipe is ``{expert: weight}`` plus a merge method. It is canonical (names
sorted, weights rounded to 4 decimals, zero weights dropped) so that equal
recipes share a dense-path group and a cached merged adapter.

Accepted `model` strings (``parse_model``):

* the base model's name              -> the empty recipe (base weights)
* an expert name                     -> ``{name: 1.0}``
* an expression ``0.7*add+0.3*rev``  -> that recipe; terms are ``[sign][weight*]name``,
  so ``add-0.5*rev`` (task negation) works too; since names may contain ``-``, the
  longest known expert name wins (``code-v2`` is an expert, not ``code - v2``)
* ``<method>:<expression>``          -> a non-linear merge on the dense path, e.g.
  ``ties:add+rev`` (methods: experts.merge, aliases as in ``deltaserve merge``)
* ``<method>(<k>=<v>,...):<expression>`` -> that merge with options, e.g.
  ``ties(density=0.3):add+rev`` or ``dare_ties(density=0.5,seed=3):add+rev``; the
  options are checked against the method's options model and are part of the key.
  Options may be separated by ``;`` as well, and the canonical key uses ``;``
  (``dare_ties(density=0.5;seed=3):add+rev``): recipe IDs hold no comma, because
  the Kubernetes inference gateway's endpoint picker splits adapter lists on commas
* a named recipe (``POST /v1/recipes``; server.service resolves those before this module)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from typing import Any

from deltaserve.experts.merge.registry import METHOD_ALIASES
from deltaserve.experts.merge import MERGE_METHODS
from deltaserve.experts.registry import OptionsError, UnknownNameError

MAX_TERMS = 8
MAX_ABS_WEIGHT = 10.0
_TERM = re.compile(r"\s*(?P<sign>[+-])?\s*(?:(?P<weight>\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*\*\s*)?"
                   r"(?P<name>[a-z0-9][a-z0-9_.-]*)\s*")
_METHOD = re.compile(r"^\s*(?P<method>[a-z_]+)\s*(?:\((?P<options>[^()]*)\))?\s*$")
_NUMBER = re.compile(r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?")


class RecipeError(ValueError):
    """The `model` string is not a valid recipe (shown to the client as a 400)."""

    param = "model"


class UnknownModelError(RecipeError):
    """The `model` string looks like a name but no such model is served (a 404)."""


@dataclass(frozen=True)
class Recipe:
    terms: tuple[tuple[str, float], ...] = ()
    method: str = "task_arithmetic"
    options: tuple[tuple[str, Any], ...] = ()   # merge options given explicitly, sorted by name

    @property
    def key(self) -> str:
        """Canonical text, comma-free: ``""`` for the base, else e.g. ``add``, ``0.7*add+0.3*rev``,
        ``ties(density=0.3;seed=3):a+b``."""
        if not self.terms:
            return ""
        text = "+".join(n if w == 1.0 else f"{_fmt(w)}*{n}" for n, w in self.terms).replace("+-", "-")
        if self.method == "task_arithmetic" and not self.options:
            return text
        options = ";".join(f"{k}={_fmt_value(v)}" for k, v in self.options)
        return f"{self.method}({options}):{text}" if options else f"{self.method}:{text}"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.terms)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(w for _, w in self.terms)

    def label(self, base_name: str) -> str:
        """What responses and metrics call it: the base's name for the empty recipe."""
        return self.key or base_name

    @property
    def option_dict(self) -> dict[str, Any]:
        return dict(self.options)

    @classmethod
    def of(cls, weights: dict[str, float], method: str = "task_arithmetic",
           options: dict[str, Any] | None = None) -> Recipe:
        merged: dict[str, float] = {}
        for name, w in weights.items():
            merged[name] = merged.get(name, 0.0) + float(w)
        terms = tuple(sorted((n, round(w, 4)) for n, w in merged.items() if round(w, 4) != 0.0))
        return cls(terms, METHOD_ALIASES.get(method, method), tuple(sorted((options or {}).items())))


def _fmt(w: float) -> str:
    return f"{w:.4f}".rstrip("0").rstrip(".")


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def parse_method(text: str) -> tuple[str, dict[str, Any]]:
    """``"ties(density=0.3)"`` -> ``("ties", {"density": 0.3})``, checked against the method's options."""
    m = _METHOD.match(text)
    if not m:
        raise RecipeError(f"cannot parse the merge method {text!r}; write e.g. 'ties:a+b' or 'ties(density=0.3):a+b'")
    method = METHOD_ALIASES.get(m["method"], m["method"])
    try:
        MERGE_METHODS[method]
    except UnknownNameError:
        raise RecipeError(f"unknown merge method {method!r} in `model`; known: {sorted(MERGE_METHODS)}") from None
    given: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in re.split("[,;]", m["options"] or ""))):
        key, sep, value = (x.strip() for x in item.partition("="))
        if not sep or not key or not value:
            raise RecipeError(f"merge option {item!r} must be written key=value")
        if key in given:
            raise RecipeError(f"merge option {key!r} is given twice")
        given[key] = _literal(value)
    try:
        checked = MERGE_METHODS.parse_options(method, given)
    except OptionsError as err:
        raise RecipeError(str(err)) from None
    defaults = type(checked)()
    return method, {k: getattr(checked, k) for k in given if getattr(checked, k) != getattr(defaults, k)}


def _literal(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_model(model: str, *, base_name: str, experts: set[str] | frozenset[str]) -> Recipe:
    """Resolve a request's `model` string; raises RecipeError with a message a client can act on."""
    if not isinstance(model, str) or not model.strip():
        raise RecipeError("`model` must be a non-empty string: the base, an expert name, 'auto' or an expression")
    text = model.strip()
    if text == base_name:
        return Recipe()
    if text in experts:
        return Recipe(((text, 1.0),))
    method = "task_arithmetic"
    options: dict[str, Any] = {}
    if ":" in text:
        head, text = text.split(":", 1)
        method, options = parse_method(head)
    weights: dict[str, float] = {}
    pos = 0
    while pos < len(text):
        m = _TERM.match(text, pos)
        if not m or m.end() == pos or (pos > 0 and not m["sign"]):
            raise RecipeError(_unknown_model(model, base_name, experts,
                                             detail=f"cannot parse at {text[pos:pos + 20]!r}"))
        name = m["name"]
        while name not in experts and "-" in name:   # 'a-0.5*b': names may hold '-', so back off to a known one
            name = name[: name.rindex("-")]
        if name not in experts:
            name = m["name"]
            error = UnknownModelError if text == model.strip() and _looks_like_name(model) else RecipeError
            raise error(_unknown_model(model, base_name, experts, detail=f"unknown expert {name!r}"))
        raw = _NUMBER.match(text, m.start("weight")) if m["weight"] else None
        weight = float(raw.group(0)) if raw else 1.0
        weight = -weight if m["sign"] == "-" else weight
        if not math.isfinite(weight) or abs(weight) > MAX_ABS_WEIGHT:
            raise RecipeError(f"weight {weight} for {name!r} must be finite with |w| <= {MAX_ABS_WEIGHT}")
        if name in weights:
            raise RecipeError(f"expert {name!r} appears twice in {model!r}")
        weights[name] = weight
        pos = m.start("name") + len(name)
        while pos < len(text) and text[pos].isspace():
            pos += 1
    if len(weights) > MAX_TERMS:
        raise RecipeError(f"at most {MAX_TERMS} experts per recipe, got {len(weights)}")
    recipe = Recipe.of(weights, method, options)
    if not recipe.terms:
        raise RecipeError(f"{model!r} has no expert with a non-zero weight")
    return recipe


def _unknown_model(model: str, base_name: str, experts, detail: str) -> str:
    shown = sorted(experts)[:20]
    more = f" (+{len(experts) - 20} more)" if len(experts) > 20 else ""
    return (f"model {model!r} is not servable: {detail}. Use the base {base_name!r}, 'auto', an expert "
            f"({shown}{more}) or an expression like '0.7*a+0.3*b'")


def _looks_like_name(model: str) -> bool:
    return bool(model) and all(c.isalnum() or c in "_.-" for c in model.strip())
