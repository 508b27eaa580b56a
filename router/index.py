"""Exemplar features per expert and a cosine nearest-neighbour index over them.

The exemplar routers (knn, gate) keep one :class:`ExemplarSet` and rebuild an
immutable snapshot after every change; ``score`` reads whichever snapshot is
current, so routing never sees a half-updated index and needs no lock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from deltaserve.router.features import Encoder


def _check_name(expert: str) -> None:
    if not isinstance(expert, str) or not expert:
        raise ValueError(f"expert name must be a non-empty string, got {expert!r}")


@dataclass(frozen=True)
class Snapshot:
    """All exemplars at one moment: features (n, d), label index per row, names."""

    names: tuple[str, ...]
    features: np.ndarray
    labels: np.ndarray

    @property
    def empty(self) -> bool:
        return len(self.names) == 0


class ExemplarSet:
    """Per-expert exemplar features; experts with no texts are not kept."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self._features: dict[str, np.ndarray] = {}
        self._texts: dict[str, tuple[str, ...]] = {}   # the texts each expert's features were encoded from

    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(sorted(self._features))

    def replace(self, exemplars: Mapping[str, Sequence[str]]) -> None:
        """Set every expert's exemplars; an expert whose texts did not change keeps its features (only new or
        changed experts are encoded, so one registration in a large store encodes one expert's texts)."""
        for name in exemplars:
            _check_name(name)
        wanted = {n: tuple(exemplars[n]) for n in sorted(exemplars) if len(exemplars[n]) > 0}
        fresh = [n for n, texts in wanted.items() if self._texts.get(n) != texts]
        texts = [t for n in fresh for t in wanted[n]]
        vectors = self.encoder.encode(texts) if texts else np.zeros((0, self.encoder.dim), np.float32)
        features, start = {n: self._features[n] for n in wanted if n not in fresh}, 0
        for name in fresh:
            features[name] = vectors[start : start + len(wanted[name])]
            start += len(wanted[name])
        self._features, self._texts = features, wanted

    def add(self, expert: str, texts: Sequence[str]) -> None:
        """Append ``texts`` to ``expert``'s exemplars (creating the expert)."""
        _check_name(expert)
        if not texts:
            return
        new = self.encoder.encode(list(texts))
        old = self._features.get(expert)
        self._features = {**self._features, expert: new if old is None else np.vstack([old, new])}
        self._texts = {**self._texts, expert: (*self._texts.get(expert, ()), *texts)}

    def remove(self, expert: str) -> None:
        """Forget ``expert``; unknown names are ignored (removal is idempotent)."""
        self._features = {n: f for n, f in self._features.items() if n != expert}
        self._texts = {n: t for n, t in self._texts.items() if n != expert}

    def snapshot(self) -> Snapshot:
        names = self.experts
        if not names:
            return Snapshot((), np.zeros((0, self.encoder.dim), np.float32), np.zeros(0, np.int64))
        features = np.vstack([self._features[n] for n in names]).astype(np.float32, copy=False)
        labels = np.concatenate([np.full(len(self._features[n]), i, np.int64) for i, n in enumerate(names)])
        return Snapshot(names, features, labels)


class CosineIndex:
    """Exact cosine k-nearest neighbours by one matrix product over unit vectors.

    Same answer as scikit-learn's ``NearestNeighbors(metric="cosine")`` (the tests
    use it as the reference) but ~25x faster for one query at 5,000 exemplars
    (0.5 ms vs 13 ms here): sklearn re-normalises the whole exemplar matrix and
    validates inputs on every call.
    """

    def __init__(self, snapshot: Snapshot, k: int):
        self.snapshot = snapshot
        self.k = min(k, len(snapshot.labels))
        norms = np.linalg.norm(snapshot.features, axis=1, keepdims=True)
        self._unit_t = np.ascontiguousarray((snapshot.features / np.maximum(norms, 1e-12)).T, dtype=np.float32)

    def query(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(cosine distances, expert label indices), both (n, k), nearest first."""
        queries = np.asarray(features, dtype=np.float32)
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        similarity = queries @ self._unit_t
        k, n_rows = self.k, similarity.shape[1]
        if k == 1:   # the gate's nearest-exemplar distance: one argmax, no partition or sort
            rows = similarity.argmax(axis=1)[:, None]
            distances = 1.0 - np.take_along_axis(similarity, rows, axis=1).astype(np.float64)
            return np.clip(distances, 0.0, 2.0), self.snapshot.labels[rows]
        if k < n_rows:
            rows = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        else:
            rows = np.tile(np.arange(n_rows), (len(queries), 1))
        picked = np.take_along_axis(similarity, rows, axis=1)
        order = np.argsort(-picked, axis=1, kind="stable")
        rows = np.take_along_axis(rows, order, axis=1)
        distances = 1.0 - np.take_along_axis(picked, order, axis=1).astype(np.float64)
        return np.clip(distances, 0.0, 2.0), self.snapshot.labels[rows]


class ExemplarRouter:
    """What knn and gate share: exemplars encoded into an ExemplarSet, rebuilt on every change.

    Subclasses set ``name``, implement ``_rebuild`` (from ``self._exemplars.snapshot()``),
    ``experts`` and ``score``.
    """

    needs_exemplars = True

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder
        self._exemplars = ExemplarSet(encoder)

    def fit(self, exemplars: Mapping[str, Sequence[str]]) -> None:
        self._exemplars.replace(exemplars)
        self._rebuild()

    def add(self, expert: str, texts: Sequence[str]) -> None:
        self._exemplars.add(expert, texts)
        self._rebuild()

    def remove(self, expert: str) -> None:
        self._exemplars.remove(expert)
        self._rebuild()

    def _rebuild(self) -> None:
        raise NotImplementedError
