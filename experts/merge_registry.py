"""The merge-method registry: ``@merge_method(name, Options)`` and the options models (experts.merging).

A merge method is ``fn(deltas, weights, *, <options>, <runtime>)``: options are
what a user configures (CLI flags, recipes such as ``ties(density=0.3):a+b``)
and are checked against the method's options model (pydantic, with bounds);
runtime arguments (DARE's ``generator`` or injected ``masks``) are keyword-only
parameters of ``fn`` outside the model, for programmatic use and tests.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from typing import Annotated, Literal

from pydantic import Field, StrictBool
from torch import Tensor

from deltaserve.experts.registry import NoOptions, Options, Registry

#: Default kept fraction for the sparsifying methods (TIES paper: top-20 %).
DEFAULT_DENSITY = 0.2
SignMethod = Literal["total", "frequency"]
SignSource = Literal["weighted", "unweighted"]
Normalize = Literal["weight", "count", "none"]


class MergeMethod:
    """A registered merge function, its options model and its runtime-only keyword arguments.

    ``fn(deltas, weights, *, <options>, <runtime>)``: options are what a user
    configures (CLI, recipes such as ``ties(density=0.3):a+b``) and are checked
    against the options model; runtime arguments (e.g. DARE's ``generator`` or
    injected ``masks``) are keyword-only parameters of ``fn`` outside the model.
    """

    def __init__(self, name: str, fn: Callable[..., Tensor], options: type[Options]) -> None:
        parameters = list(inspect.signature(fn).parameters.values())
        positional = [p.name for p in parameters if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        if positional != ["deltas", "weights"]:
            raise ValueError(f"merge method {name!r} must take (deltas, weights, *, ...), got {positional}")
        keywords = [p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY]
        if missing := sorted(set(options.model_fields) - set(keywords)):
            raise ValueError(f"merge method {name!r}: options {missing} are not keyword-only parameters of fn")
        self.name = name
        self.fn = fn
        self.options_model = options
        self.options = tuple(options.model_fields)
        self.runtime = tuple(k for k in keywords if k not in options.model_fields)
        functools.update_wrapper(self, fn)

    def __call__(self, deltas: Sequence[Tensor], weights: Sequence[float], **kwargs: object) -> Tensor:
        runtime = {k: kwargs.pop(k) for k in self.runtime if k in kwargs}
        options = MERGE_METHODS.parse_options(self.name, kwargs)
        return self.fn(deltas, weights, **options.model_dump(), **runtime)

    def __repr__(self) -> str:
        return f"MergeMethod({self.name!r}, options={self.options})"


MERGE_METHODS: Registry[MergeMethod] = Registry("merge method")


def merge_method(name: str, options: type[Options] = NoOptions) -> Callable[[Callable[..., Tensor]], MergeMethod]:
    """Register ``fn(deltas, weights, *, ...)`` under ``name`` with its options model; duplicates are rejected."""

    def register(fn: Callable[..., Tensor]) -> MergeMethod:
        return MERGE_METHODS.add(name, MergeMethod(name, fn, options), options)

    return register


def get_merge_method(name: str) -> MergeMethod:
    """The method registered as ``name``; a miss lists the known names."""
    return MERGE_METHODS[name]


# -------------------------------------------------------------------------- options

Density = Annotated[float, Field(gt=0.0, le=1.0, description="kept fraction of each task vector, per tensor")]


class TiesOptions(Options):
    density: Density = DEFAULT_DENSITY
    sign_method: SignMethod = Field("total", description="elect by the sum of values or by sign counts")
    sign_source: SignSource = Field("weighted", description="voters are w_i*tau_i (mergekit) or tau_i (PEFT)")
    normalize: Normalize = Field("weight", description="divide by the agreeing weights, count, or not at all")


class DareOptions(Options):
    density: Density = DEFAULT_DENSITY
    seed: int = Field(0, ge=0, le=2**63 - 1, description="random drops: one stream per parameter from this seed")
    rescale: StrictBool = Field(True, description="divide kept entries by density")


class DareTiesOptions(DareOptions, TiesOptions):
    pass


class BreadcrumbsOptions(Options):
    density: Density = DEFAULT_DENSITY
    gamma: float = Field(0.01, ge=0.0, lt=1.0, description="fraction of the largest magnitudes dropped as outliers")


class BreadcrumbsTiesOptions(BreadcrumbsOptions, TiesOptions):
    pass


class PcbOptions(Options):
    ratio: float = Field(0.1, gt=0.0, le=1.0, description="kept fraction of the balanced scores")
