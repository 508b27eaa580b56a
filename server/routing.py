"""The router the server runs for ``model: auto``: built from settings, fed by the engine.

knn and gate route on sentence features of the user's text; the uncertainty
router scores candidate experts through the engine (``score_answers``), called
from the router's worker thread back onto the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from deltaserve.server.recipes import parse_model

SCORE_TIMEOUT_S = 300
FEATURES_DIR = ".features"


def build_routing(service: Any, loop: asyncio.AbstractEventLoop) -> Any:
    """The configured ``router.RoutingService`` (``service.settings.router``), or None for 'none'."""
    rs = service.settings.router
    if rs.name == "none":
        return None
    import torch

    from deltaserve.router import ROUTERS, Policy, RoutingService, make_router
    from deltaserve.router.base import DEFAULT_MAX_DISTANCE, DEFAULT_MIN_CONFIDENCE

    # The engine runs in its own processes; here torch only encodes one prompt at a time, and
    # OpenMP threads competing with the engine made that 100x slower (0.5 s vs 5 ms, measured).
    torch.set_num_threads(1)
    fallback = dict(parse_model(rs.fallback, base_name=service.base_name,
                                experts=frozenset(service.engine.experts)).terms) if rs.fallback else {}
    needs = ROUTERS[rs.name].needs
    deps: dict[str, Any] = {}
    if "encoder" in needs:
        from deltaserve.router.features import make_encoder

        deps["encoder"] = make_encoder(rs.encoder)
    if "uncertainty_scorer" in needs:
        deps["uncertainty_scorer"] = engine_scorer(service.engine, loop)
    router = make_router(rs.name, **deps, **rs.options)
    if hasattr(router, "keep_features"):   # exemplar features on disk beside the store (router.index.FeatureCache)
        router.keep_features(service.store.root / FEATURES_DIR)
    # thresholds belong to the features they were calibrated on (router/base.py, router/static.py)
    encoder = deps.get("encoder")
    max_distance = None
    if encoder is not None:
        max_distance = rs.max_distance if rs.max_distance is not None else getattr(
            encoder, "default_max_distance", DEFAULT_MAX_DISTANCE)
    min_confidence = rs.min_confidence if rs.min_confidence is not None else getattr(
        encoder, "default_min_confidence", DEFAULT_MIN_CONFIDENCE)
    policy = Policy(top_k=rs.top_k, grid=rs.grid, max_distance=max_distance, fallback=fallback,
                    min_confidence=min_confidence)
    m = service.metrics   # series exist from the start, so Prometheus' rate() sees their first increment
    m.route_decisions.labels(rs.name, "fallback")
    m.router_latency.labels(rs.name)
    m.route_confidence.labels(rs.name)
    for reason in ("low_confidence", "out_of_distribution", "no_experts"):
        m.route_fallbacks.labels(rs.name, reason)
    return RoutingService(router, policy)


def engine_scorer(engine: Any, loop: asyncio.AbstractEventLoop):
    """``(texts, experts) -> NLL matrix`` through ``engine.score_answers``, callable from a worker thread."""
    import numpy as np

    def scorer(texts, experts):
        future = asyncio.run_coroutine_threadsafe(engine.score_answers(list(texts), list(experts)), loop)
        return np.asarray(future.result(timeout=SCORE_TIMEOUT_S))

    return scorer
