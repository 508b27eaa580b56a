"""What every router shares: the Router protocol, the policy that turns scores into
a canonical recipe, the Decision it produces, and the one registry of routers.

A router only *scores* (per text: expert -> probability, plus the distance to the
nearest exemplar where it has one). The :class:`Policy` decides: top-k experts,
weights quantised to a grid so that equal recipes batch together on the dense
path, and a fallback recipe when the router is unsure or the text is out of
distribution.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, cast, runtime_checkable

from deltaserve.experts.registry import NoOptions, Options, Registry

FallbackReason = Literal["low_confidence", "out_of_distribution", "no_experts"]
Scores = dict[str, float]
ScoredText = tuple[Scores, float | None]

# Calibrated on the zoo with all-MiniLM-L6-v2 features (the SentenceEncoder), by
#   .venv/bin/python -m bench.routing.calibrate --out results/routing/calibration.json
# -> max_distance 0.68 (99th percentile 0.625 of leave-one-phrasing-out calib
# distances + 0.05 margin), min_confidence 0.4; 19/20 OOD texts fall back
# (results/routing/README.md). Cosine distances: these numbers belong to that
# encoder; other features (BaseHiddenStates) need their own calibration.
DEFAULT_MAX_DISTANCE = 0.68
DEFAULT_MIN_CONFIDENCE = 0.4


@dataclass(frozen=True)
class Decision:
    """One routing decision. ``recipe`` is canonical: sorted names, weights on the
    policy grid summing to 1; ``{}`` is the base model. ``scores`` are the router's
    (experts not listed scored 0). ``latency_s`` is the wall time of the routing
    call that produced it (shared by the texts of one batch)."""

    recipe: dict[str, float]
    router: str
    scores: dict[str, float]
    confidence: float
    distance: float | None
    fallback: FallbackReason | None
    latency_s: float
    quality: dict[str, float] = field(default_factory=dict)   # the quality factors applied to the scores
    encoder: str | None = None   # the prompt features the scores came from (None: a router without an encoder)

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": dict(self.recipe),
            "router": self.router,
            "scores": {name: round(value, 6) for name, value in self.scores.items()},
            "confidence": round(self.confidence, 6),
            "distance": None if self.distance is None else round(self.distance, 6),
            "fallback": self.fallback,
            "latency_s": round(self.latency_s, 6),
            "quality": {name: round(value, 6) for name, value in self.quality.items()},
            "encoder": self.encoder,
        }


@runtime_checkable
class Router(Protocol):
    """Scores texts against experts. ``fit`` rebuilds from scratch; ``add`` and
    ``remove`` change one expert and take effect for the next ``score`` call."""

    name: str
    needs_exemplars: bool

    @property
    def experts(self) -> tuple[str, ...]: ...

    def fit(self, exemplars: Mapping[str, Sequence[str]]) -> None: ...

    def add(self, expert: str, texts: Sequence[str]) -> None: ...

    def remove(self, expert: str) -> None: ...

    def score(self, texts: Sequence[str], allowed: frozenset[str] | None = None) -> list[ScoredText]:
        """Each text's scores over the experts (only the ``allowed`` ones: None is all) and distance."""
        ...


@dataclass
class Policy:
    """Scores -> recipe. ``grid`` must divide 1 (0.25: weights in quarters)."""

    top_k: int = 1
    grid: float = 0.25
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    max_distance: float | None = DEFAULT_MAX_DISTANCE
    fallback: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.top_k, int) or self.top_k < 1:
            problems.append(f"top_k must be an integer >= 1, got {self.top_k!r}")
        units = 1.0 / self.grid if self.grid > 0 else math.inf
        if not 0 < self.grid <= 1 or abs(units - round(units)) > 1e-9:
            problems.append(f"grid must be 1/n for an integer n >= 1, got {self.grid!r}")
        if not 0 <= self.min_confidence <= 1:
            problems.append(f"min_confidence must be in [0, 1], got {self.min_confidence!r}")
        if self.max_distance is not None and self.max_distance < 0:
            problems.append(f"max_distance must be >= 0 or None, got {self.max_distance!r}")
        if any(not math.isfinite(w) for w in self.fallback.values()):
            problems.append(f"fallback weights must be finite, got {self.fallback!r}")
        if problems:
            raise ValueError("invalid routing policy: " + "; ".join(problems))
        self.fallback = {name: float(self.fallback[name]) for name in sorted(self.fallback)}

    @property
    def grid_units(self) -> int:
        return round(1.0 / self.grid)

    def fallback_reason(self, scores: Scores, distance: float | None) -> FallbackReason | None:
        if not scores:
            return "no_experts"
        if self.max_distance is not None and distance is not None and distance > self.max_distance:
            return "out_of_distribution"
        if max(scores.values()) < self.min_confidence:
            return "low_confidence"
        return None

    def decide(self, scores: Scores, distance: float | None) -> tuple[dict[str, float], float, FallbackReason | None]:
        """(recipe, confidence, fallback reason) for one text's scores."""
        confidence = max(scores.values(), default=0.0)
        reason = self.fallback_reason(scores, distance)
        if reason is not None:
            return dict(self.fallback), confidence, reason
        return quantised_recipe(scores, self.top_k, self.grid_units), confidence, None


def quantised_recipe(scores: Mapping[str, float], top_k: int, units: int) -> dict[str, float]:
    """Top-``top_k`` scores, normalised, apportioned into ``units`` equal parts by
    largest remainder (so weights are exact multiples of 1/units and sum to 1);
    experts that get no part are dropped. Ties break by name, so it is deterministic."""
    if len(scores) > top_k:   # only the scores that can make the top k go through the keyed sort (100s of experts)
        cutoff = sorted(scores.values(), reverse=True)[top_k - 1]
        scores = {name: v for name, v in scores.items() if v >= cutoff}
    ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:top_k]
    total = sum(max(v, 0.0) for _, v in ranked)
    if total <= 0:  # all-zero scores: the first by name takes the whole recipe
        ranked, total = [(ranked[0][0], 1.0)], 1.0
    shares = [(name, max(v, 0.0) / total * units) for name, v in ranked]
    parts = {name: math.floor(share + 1e-9) for name, share in shares}
    left = units - sum(parts.values())
    by_remainder = sorted(shares, key=lambda item: (-(item[1] - parts[item[0]]), -item[1], item[0]))
    for name, _ in by_remainder[:left]:
        parts[name] += 1
    return {name: round(parts[name] / units, 6) for name in sorted(parts) if parts[name] > 0}


class RouterClass(Protocol):
    """A registered router class: ``register_router`` sets ``name`` and ``needs``; constructed as
    ``cls(*needs, **options)``."""

    name: str
    needs: tuple[str, ...]

    def __call__(self, *dependencies: Any, **options: Any) -> Router: ...


ROUTERS: Registry[RouterClass] = Registry("router")
DEPENDENCIES = ("encoder", "uncertainty_scorer")


def register_router(name: str, options: type[Options] = NoOptions,
                    needs: tuple[str, ...] = ()) -> Callable[[type], type]:
    """Class decorator: register a router class under ``name`` with its options model.

    ``needs`` names what the router is built with besides its options: ``encoder``
    (prompt features) and/or ``uncertainty_scorer`` (texts, experts -> NLL matrix).
    The class is constructed as ``cls(*needs, **options)``.
    """
    if unknown := sorted(set(needs) - set(DEPENDENCIES)):
        raise ValueError(f"router {name!r} needs unknown dependencies {unknown}; known: {list(DEPENDENCIES)}")

    def register(cls: type[Any]) -> type[Any]:
        cls.name = name
        cls.needs = tuple(needs)
        ROUTERS.add(name, cast(RouterClass, cls), options)   # it is one now that name and needs are set
        return cls

    return register


def make_router(name: str, *, encoder: Any = None, uncertainty_scorer: Any = None, **options: Any) -> Router:
    """Build a registered router. ``encoder``: features for knn/gate (default: a new
    :class:`router.features.SentenceEncoder`); ``uncertainty_scorer``: the NLL scorer
    the uncertainty router needs. ``options`` are checked against the router's options
    model (k, temperature, C, ...); an unknown one is refused with the valid ones listed."""
    cls = ROUTERS[name]
    checked = ROUTERS.parse_options(name, options)
    given = {"encoder": encoder, "uncertainty_scorer": uncertainty_scorer}
    if "encoder" in cls.needs and encoder is None:
        from deltaserve.router.features import SentenceEncoder

        given["encoder"] = SentenceEncoder()
    missing = [n for n in cls.needs if given[n] is None]
    if missing:
        raise ValueError(f"router {name!r} needs {missing[0]}")
    return cls(*(given[n] for n in cls.needs), **checked.model_dump())
