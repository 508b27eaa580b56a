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
  ``ties:add+rev`` (methods: experts.merging, aliases as in ``deltaserve merge``)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from experts.merge_model import METHOD_ALIASES
from experts.merging import MERGE_METHODS

MAX_TERMS = 8
MAX_ABS_WEIGHT = 10.0
_TERM = re.compile(r"\s*(?P<sign>[+-])?\s*(?:(?P<weight>\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?\s*\*\s*)?(?P<name>[a-z0-9][a-z0-9_.-]*)\s*")
_NUMBER = re.compile(r"\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?")


class RecipeError(ValueError):
    """The `model` string is not a valid recipe (shown to the client as a 400)."""


@dataclass(frozen=True)
class Recipe:
    terms: tuple[tuple[str, float], ...] = ()
    method: str = "task_arithmetic"

    @property
    def key(self) -> str:
        """Canonical text: ``""`` for the base, else e.g. ``add`` or ``0.7*add+0.3*rev`` (``ties:...`` if not TA)."""
        if not self.terms:
            return ""
        text = "+".join(n if w == 1.0 else f"{_fmt(w)}*{n}" for n, w in self.terms).replace("+-", "-")
        return text if self.method == "task_arithmetic" else f"{self.method}:{text}"

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self.terms)

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(w for _, w in self.terms)

    def label(self, base_name: str) -> str:
        """What responses and metrics call it: the base's name for the empty recipe."""
        return self.key or base_name

    @classmethod
    def of(cls, weights: dict[str, float], method: str = "task_arithmetic") -> Recipe:
        merged: dict[str, float] = {}
        for name, w in weights.items():
            merged[name] = merged.get(name, 0.0) + float(w)
        terms = tuple(sorted((n, round(w, 4)) for n, w in merged.items() if round(w, 4) != 0.0))
        return cls(terms, METHOD_ALIASES.get(method, method))


def _fmt(w: float) -> str:
    return f"{w:.4f}".rstrip("0").rstrip(".")


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
    if ":" in text:
        method, text = (p.strip() for p in text.split(":", 1))
        method = METHOD_ALIASES.get(method, method)
        if method not in MERGE_METHODS or method == "lora_concat":
            raise RecipeError(f"unknown merge method {method!r} in `model`; known: {sorted(MERGE_METHODS)}")
    weights: dict[str, float] = {}
    pos = 0
    while pos < len(text):
        m = _TERM.match(text, pos)
        if not m or m.end() == pos or (pos > 0 and not m["sign"]):
            raise RecipeError(_unknown_model(model, base_name, experts, detail=f"cannot parse at {text[pos:pos + 20]!r}"))
        name = m["name"]
        while name not in experts and "-" in name:   # 'a-0.5*b': names may hold '-', so back off to a known one
            name = name[: name.rindex("-")]
        if name not in experts:
            name = m["name"]
            raise RecipeError(_unknown_model(model, base_name, experts, detail=f"unknown expert {name!r}"))
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
    recipe = Recipe.of(weights, method)
    if not recipe.terms:
        raise RecipeError(f"{model!r} has no expert with a non-zero weight")
    return recipe


def _unknown_model(model: str, base_name: str, experts, detail: str) -> str:
    shown = sorted(experts)[:20]
    more = f" (+{len(experts) - 20} more)" if len(experts) > 20 else ""
    return (f"model {model!r} is not servable: {detail}. Use the base {base_name!r}, 'auto', an expert "
            f"({shown}{more}) or an expression like '0.7*a+0.3*b'")
