"""Per-request routing: prompt -> features -> router scores -> policy -> recipe.

Importing the package registers every router (knn, gate, uncertainty) in
:data:`router.base.ROUTERS`; build one with :func:`make_router` and serve it
through a :class:`RoutingService`.
"""

from router.base import (
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
from router.features import ENCODERS, BaseHiddenStates, SentenceEncoder, make_encoder
from router.gate import GateRouter
from router.knn import KnnRouter
from router.service import RoutingService
from router.text import route_text
from router.uncertainty import UncertaintyRouter, hf_nll_scorer

__all__ = [
    "DEFAULT_MAX_DISTANCE", "DEFAULT_MIN_CONFIDENCE", "ENCODERS", "ROUTERS", "BaseHiddenStates", "Decision", "GateRouter",
    "KnnRouter", "Policy", "Router", "RoutingService", "SentenceEncoder", "UncertaintyRouter", "hf_nll_scorer",
    "make_encoder", "make_router", "quantised_recipe", "register_router", "route_text",
]
