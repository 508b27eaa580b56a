"""Per-request routing: prompt -> features -> router scores -> policy -> recipe.

Importing the package registers every router (knn, gate, uncertainty) in
:data:`router.base.ROUTERS`; build one with :func:`make_router` and serve it
through a :class:`RoutingService`.
"""

from deltaserve.router.base import (
    DEFAULT_MAX_DISTANCE,
    DEFAULT_MIN_CONFIDENCE,
    ROUTERS,
    Decision,
    Policy,
    Router,
    make_router,
    quantised_recipe,
    register_router,
)
from deltaserve.router.features import ENCODERS, BaseHiddenStates, SentenceEncoder, make_encoder
from deltaserve.router.gate import GateRouter
from deltaserve.router.knn import KnnRouter
from deltaserve.router.service import RoutingService
from deltaserve.router.text import route_text
from deltaserve.router.uncertainty import UncertaintyRouter, hf_nll_scorer

__all__ = [
    "DEFAULT_MAX_DISTANCE", "DEFAULT_MIN_CONFIDENCE", "ENCODERS", "ROUTERS", "BaseHiddenStates", "Decision",
    "GateRouter", "KnnRouter", "Policy", "Router", "RoutingService", "SentenceEncoder", "UncertaintyRouter",
    "hf_nll_scorer", "make_encoder", "make_router", "quantised_recipe", "register_router", "route_text",
]
