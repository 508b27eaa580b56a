"""A learned gate: multinomial logistic regression over exemplar features.

Retrained from scratch on every ``fit``/``add``/``remove`` (seconds at hundreds
of experts; see results/routing/). Scores are the classifier's probabilities
(optionally sigmoid-calibrated by cross-validation); ``distance`` is the cosine
distance to the nearest training exemplar, for the policy's OOD check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression

from pydantic import Field

from deltaserve.experts.registry import Options
from deltaserve.router.base import ScoredText, register_router
from deltaserve.router.features import Encoder
from deltaserve.router.index import CosineIndex, ExemplarRouter, allowed_rows, Snapshot


@dataclass(frozen=True)
class _Trained:
    snapshot: Snapshot
    classifier: Any | None  # None with a single expert: it takes every text
    nearest: CosineIndex


def train_gate(snapshot: Snapshot, C: float, max_iter: int, calibrate: bool, seed: int = 0) -> Any | None:
    """A fitted classifier over the snapshot (labels = expert indices), or None for one expert."""
    if len(snapshot.names) < 2:
        return None
    model = LogisticRegression(C=C, max_iter=max_iter, class_weight="balanced", random_state=seed)
    smallest = int(np.bincount(snapshot.labels).min())
    if calibrate and smallest >= 2:
        model = CalibratedClassifierCV(model, method="sigmoid", cv=min(3, smallest))
    return model.fit(snapshot.features, snapshot.labels)


class GateOptions(Options):
    C: float = Field(10.0, gt=0.0, le=1e6, description="inverse regularisation of the logistic regression")
    max_iter: int = Field(1000, ge=1, le=100_000, description="solver iterations")
    calibrate: bool = Field(False, description="sigmoid-calibrate probabilities by cross-validation")


@register_router("gate", GateOptions, needs=("encoder",))
class GateRouter(ExemplarRouter):
    """Twin-Merging style: a logistic-regression gate over exemplar features."""


    def __init__(self, encoder: Encoder, C: float = 10.0, max_iter: int = 1000, calibrate: bool = False):
        if C <= 0 or max_iter < 1:
            raise ValueError(f"gate router needs C > 0 and max_iter >= 1, got C={C}, max_iter={max_iter}")
        super().__init__(encoder)
        self.C = C
        self.max_iter = max_iter
        self.calibrate = calibrate
        self._trained: _Trained | None = None

    @property
    def experts(self) -> tuple[str, ...]:
        trained = self._trained
        return trained.snapshot.names if trained is not None else ()

    def _rebuild(self) -> None:
        snapshot = self._exemplars.snapshot()
        if snapshot.empty:
            self._trained = None
            return
        classifier = train_gate(snapshot, self.C, self.max_iter, self.calibrate)
        self._trained = _Trained(snapshot, classifier, CosineIndex(snapshot, 1))

    def score(self, texts: Sequence[str], allowed: frozenset[str] | None = None) -> list[ScoredText]:
        """The gate's probabilities; with ``allowed``, conditioned on those experts (renormalised over them)."""
        trained = self._trained
        experts, rows = (None, None) if trained is None else allowed_rows(trained.snapshot, allowed)
        if trained is None or (experts is not None and not experts.any()):
            return [({}, None) for _ in texts]
        features = self.encoder.encode(texts)
        distances, _ = trained.nearest.query(features, rows)
        names = trained.snapshot.names
        if trained.classifier is None:
            probs = np.ones((len(texts), 1))
        else:
            probs = np.zeros((len(texts), len(names)))
            probs[:, trained.classifier.classes_] = trained.classifier.predict_proba(features)
        if experts is not None:
            probs[:, ~experts] = 0.0
            probs[probs.sum(axis=1) == 0] = experts   # no mass left on the allowed experts: uniform over them
        probs = probs / probs.sum(axis=1, keepdims=True)
        return [({n: p for n, p in zip(names, row) if experts is None or p > 0}, d)
                for row, d in zip(probs.tolist(), distances[:, 0].tolist())]
