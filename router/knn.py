"""Auto-Switch routing: the k nearest exemplars vote for their experts.

Each of the ``k`` neighbours (cosine distance d) votes with weight
exp(-(d - d_min) / temperature); an expert's score is its share of the votes.
Confidence is the top share, ``distance`` the nearest neighbour's distance.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pydantic import Field

from deltaserve.experts.registry import Options
from deltaserve.router.base import ScoredText, register_router
from deltaserve.router.features import Encoder
from deltaserve.router.index import CosineIndex, ExemplarRouter, allowed_rows


def neighbour_votes(distances: np.ndarray, labels: np.ndarray, n_experts: int, temperature: float) -> np.ndarray:
    """(n, n_experts) vote shares from (n, k) neighbour distances and expert labels."""
    weights = np.exp(-(distances - distances[:, :1]) / temperature)
    votes = np.zeros((len(distances), n_experts))
    np.add.at(votes, (np.arange(len(distances))[:, None], labels), weights)
    return votes / votes.sum(axis=1, keepdims=True)


class KnnOptions(Options):
    k: int = Field(10, ge=1, le=1000, description="neighbours that vote")
    temperature: float = Field(0.05, gt=0.0, le=10.0, description="vote weight exp(-(d - d_min) / temperature)")


@register_router("knn", KnnOptions, needs=("encoder",))
class KnnRouter(ExemplarRouter):
    """Auto-Switch style: the k nearest exemplars vote, weighted by distance."""


    def __init__(self, encoder: Encoder, k: int = 10, temperature: float = 0.05):
        if k < 1 or temperature <= 0:
            raise ValueError(f"knn router needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
        super().__init__(encoder)
        self.k = k
        self.temperature = temperature
        self._index: CosineIndex | None = None

    @property
    def experts(self) -> tuple[str, ...]:
        index = self._index
        return index.snapshot.names if index is not None else ()

    def _rebuild(self) -> None:
        snapshot = self._exemplars.snapshot()
        self._index = None if snapshot.empty else CosineIndex(snapshot, self.k)

    def score(self, texts: Sequence[str], allowed: frozenset[str] | None = None) -> list[ScoredText]:
        index = self._index  # one snapshot for the whole call
        experts, rows = (None, None) if index is None else allowed_rows(index.snapshot, allowed)
        if index is None or (experts is not None and not experts.any()):
            return [({}, None) for _ in texts]
        distances, labels = index.query(self.encoder.encode(texts), rows)
        shares = neighbour_votes(distances, labels, len(index.snapshot.names), self.temperature)
        names = index.snapshot.names
        out: list[ScoredText] = []
        for row, nearest in zip(shares, distances[:, 0]):
            hit = np.flatnonzero(row)
            out.append(({names[i]: float(row[i]) for i in hit}, float(nearest)))
        return out
