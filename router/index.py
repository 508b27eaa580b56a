"""Exemplar features per expert and a cosine nearest-neighbour index over them.

The exemplar routers (knn, gate) keep one :class:`ExemplarSet` and rebuild an
immutable snapshot after every change; ``score`` reads whichever snapshot is
current, so routing never sees a half-updated index and needs no lock.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from deltaserve.router.features import Encoder

log = logging.getLogger(__name__)


def _check_name(expert: str) -> None:
    if not isinstance(expert, str) or not expert:
        raise ValueError(f"expert name must be a non-empty string, got {expert!r}")


@dataclass(frozen=True)
class Snapshot:
    """All exemplars at one moment: features (n, d), label index per row, names; ``unit``: rows are unit
    vectors already (an ExemplarSet's are), so an index need not normalise them again."""

    names: tuple[str, ...]
    features: np.ndarray
    labels: np.ndarray
    unit: bool = False

    @property
    def empty(self) -> bool:
        return len(self.names) == 0


class FeatureCache:
    """Exemplar features on disk, one small safetensors file per tuple of texts, under a folder named for the
    encoder (``<store>/.features/<encoder identity>/``): a replica starting on 10,000 experts reads 20,000
    exemplars' features instead of encoding them (minutes with MiniLM on a CPU), and replicas sharing a store
    encode each expert's exemplars once. Unreadable or missing files are encoded again; a store that cannot be
    written is only read."""

    def __init__(self, root: Path, dim: int):
        self.root, self.dim = Path(root), dim

    def _path(self, texts: Sequence[str]) -> Path:
        digest = hashlib.sha256("\x00".join(texts).encode("utf-8", "surrogatepass")).hexdigest()
        return self.root / f"{digest[:40]}.safetensors"

    def get(self, texts: Sequence[str]) -> np.ndarray | None:
        try:
            features = load_file(self._path(texts))["features"]
        except (OSError, SafetensorError, KeyError):
            return None
        return features if features.shape == (len(texts), self.dim) and features.dtype == np.float32 else None

    def prune(self, keep: Iterable[Sequence[str]], older_than_s: float = 3600.0) -> int:
        """Delete the files of texts not in ``keep`` (deleted or re-described experts) that are older than
        ``older_than_s`` (a replica sharing the store may have just written one for an expert this one has not
        seen yet); returns how many were deleted."""
        wanted = {self._path(texts).name for texts in keep}
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self.root.glob("*.safetensors"):
            try:
                if path.name not in wanted and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError:   # gone already (another replica pruned it) or read-only
                continue
        return removed

    def put(self, texts: Sequence[str], features: np.ndarray) -> None:
        path = self._path(texts)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({"features": np.ascontiguousarray(features, np.float32)}, tmp)
            os.replace(tmp, path)
        except OSError as err:
            log.debug("feature cache %s not written: %s", path, err)
            tmp.unlink(missing_ok=True)


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


class ExemplarSet:
    """Per-expert exemplar features; experts with no texts are not kept."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder
        self.cache: FeatureCache | None = None   # features on disk (FeatureCache), for the server's store
        self._features: dict[str, np.ndarray] = {}
        self._texts: dict[str, tuple[str, ...]] = {}   # the texts each expert's features were encoded from

    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(sorted(self._features))

    def texts(self) -> list[tuple[str, ...]]:
        """Each expert's exemplar texts (the tuples the feature cache is keyed by)."""
        return list(self._texts.values())

    def replace(self, exemplars: Mapping[str, Sequence[str]]) -> None:
        """Set every expert's exemplars; an expert whose texts did not change keeps its features (only new or
        changed experts are encoded, so one registration in a large store encodes one expert's texts)."""
        for name in exemplars:
            _check_name(name)
        wanted = {n: tuple(exemplars[n]) for n in sorted(exemplars) if len(exemplars[n]) > 0}
        features = {n: self._features[n] for n, texts in wanted.items() if self._texts.get(n) == texts}
        if self.cache is not None:
            for name in wanted.keys() - features.keys():
                if (cached := self.cache.get(wanted[name])) is not None:
                    features[name] = cached
        fresh = [n for n in wanted if n not in features]
        texts = [t for n in fresh for t in wanted[n]]
        vectors = _unit(self.encoder.encode(texts)) if texts else np.zeros((0, self.encoder.dim), np.float32)
        start = 0
        for name in fresh:
            features[name] = vectors[start : start + len(wanted[name])]
            start += len(wanted[name])
            if self.cache is not None:
                self.cache.put(wanted[name], features[name])
        self._features, self._texts = features, wanted

    def add(self, expert: str, texts: Sequence[str]) -> None:
        """Append ``texts`` to ``expert``'s exemplars (creating the expert)."""
        _check_name(expert)
        if not texts:
            return
        new = _unit(self.encoder.encode(list(texts)))
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
        blocks = [self._features[n] for n in names]
        features = np.concatenate(blocks).astype(np.float32, copy=False)
        labels: np.ndarray = np.repeat(np.arange(len(names), dtype=np.int64), [len(b) for b in blocks])
        return Snapshot(names, features, labels, unit=True)


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
        # (n, d) unit rows; queries multiply its transposed view (BLAS reads it as is: no copy at 20,000 rows)
        self._unit = snapshot.features.astype(np.float32, copy=False) if snapshot.unit else _unit(snapshot.features)

    def query(self, features: np.ndarray, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(cosine distances, expert label indices), both (n, k), nearest first; ``rows`` (a boolean mask over
        the exemplars, at least one True) limits the search to those exemplars."""
        queries = np.asarray(features, dtype=np.float32)
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        similarity = queries @ self._unit.T
        k, n_rows = self.k, similarity.shape[1]
        if rows is not None:
            similarity[:, ~rows] = -np.inf
            k = min(k, int(rows.sum()))
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


def allowed_rows(snapshot: Snapshot, allowed: frozenset[str] | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(expert mask, exemplar-row mask) for ``allowed`` experts; (None, None) for all."""
    if allowed is None:
        return None, None
    experts = np.fromiter((n in allowed for n in snapshot.names), dtype=bool, count=len(snapshot.names))
    return experts, experts[snapshot.labels]


class ExemplarRouter:
    """What knn and gate share: exemplars encoded into an ExemplarSet, rebuilt on every change.

    Subclasses set ``name``, implement ``_rebuild`` (from ``self._exemplars.snapshot()``),
    ``experts`` and ``score``.
    """

    needs_exemplars = True

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder
        self._exemplars = ExemplarSet(encoder)

    def keep_features(self, root: Path) -> None:
        """Keep exemplar features on disk under ``root``/<the encoder's identity> (FeatureCache)."""
        identity = getattr(self.encoder, "identity", None)
        if identity:
            self._exemplars.cache = FeatureCache(Path(root) / identity, self.encoder.dim)

    def fit(self, exemplars: Mapping[str, Sequence[str]]) -> None:
        self._exemplars.replace(exemplars)
        self._rebuild()

    def prune_features(self, older_than_s: float = 3600.0) -> int:
        """Delete feature files on disk that no current expert's exemplars use (FeatureCache.prune)."""
        cache = self._exemplars.cache
        return 0 if cache is None else cache.prune(self._exemplars.texts(), older_than_s)

    def add(self, expert: str, texts: Sequence[str]) -> None:
        self._exemplars.add(expert, texts)
        self._rebuild()

    def remove(self, expert: str) -> None:
        self._exemplars.remove(expert)
        self._rebuild()

    def _rebuild(self) -> None:
        raise NotImplementedError
