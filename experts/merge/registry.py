"""The merge-method registry: ``@merge_method(name)`` on ``fn(deltas, weights, *, <options>)``.

A method's options are its keyword-only parameters, declared once in its
signature with their types, bounds and defaults (the shared types live in
experts.options): the decorator builds the pydantic options model from the
signature (mergekit's ``easy_define`` idea), so CLI flags, recipes such as
``ties(density=0.3):a+b`` and ``deltaserve methods`` all read the same
declaration. Keyword-only parameters named in ``runtime=`` (DARE's
``generator`` or injected ``masks``) are for programmatic use and tests, not
options.

Methods live one file each in :mod:`deltaserve.experts.merge.methods`; the
registry imports that package on first use, so a new method is one new file.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Sequence

from pydantic import create_model
from torch import Tensor

from deltaserve.experts.registry import Options, Registry

#: Short names accepted wherever a method is named (CLI, recipes).
METHOD_ALIASES = {"ta": "task_arithmetic"}


class MergeMethod:
    """A registered merge function, its options model and its runtime-only keyword arguments."""

    def __init__(self, name: str, fn: Callable[..., Tensor], runtime: Sequence[str] = ()) -> None:
        parameters = list(inspect.signature(fn).parameters.values())
        positional = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        if positional != ["deltas", "weights"]:
            raise ValueError(f"merge method {name!r} must take (deltas, weights, *, ...), got {positional}")
        keywords = [p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
        if unknown := sorted(set(runtime) - {p.name for p in keywords}):
            raise ValueError(f"merge method {name!r}: runtime arguments {unknown} are not keyword-only parameters")
        hints = typing.get_type_hints(fn, include_extras=True)
        fields: dict[str, typing.Any] = {}   # name -> (annotation, default), create_model's field definitions
        for p in keywords:
            if p.name in runtime:
                continue
            if p.default is inspect.Parameter.empty:
                raise ValueError(f"merge method {name!r}: option {p.name!r} needs a default")
            fields[p.name] = (hints.get(p.name, typing.Any), p.default)
        model_name = "".join(part.title() for part in name.split("_")) + "Options"
        self.name = name
        self.fn = fn
        self.options_model: type[Options] = create_model(model_name, __base__=Options, __module__=fn.__module__,
                                                         **fields)
        self.options = tuple(fields)
        self.runtime = tuple(runtime)
        functools.update_wrapper(self, fn)

    def __call__(self, deltas: Sequence[Tensor], weights: Sequence[float], **kwargs: object) -> Tensor:
        runtime = {k: kwargs.pop(k) for k in self.runtime if k in kwargs}
        options = MERGE_METHODS.parse_options(self.name, kwargs)
        return self.fn(deltas, weights, **options.model_dump(), **runtime)

    def __repr__(self) -> str:
        return f"MergeMethod({self.name!r}, options={self.options})"


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method", package="deltaserve.experts.merge.methods")


def merge_method(name: str, *, runtime: Sequence[str] = ()) -> Callable[[Callable[..., Tensor]], MergeMethod]:
    """Register ``fn(deltas, weights, *, ...)`` under ``name``; duplicates are rejected."""

    def register(fn: Callable[..., Tensor]) -> MergeMethod:
        method = MergeMethod(name, fn, runtime)
        return MERGE_METHODS.add(name, method, method.options_model)

    return register


def get_merge_method(name: str) -> MergeMethod:
    """The method registered as ``name`` (or an alias of it); a miss lists the known names."""
    return MERGE_METHODS[METHOD_ALIASES.get(name, name)]
