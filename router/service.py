"""RoutingService: one router + one policy, safe to share between request threads.

Mutations (``set_exemplars``/``add``/``remove``) are serialised by a lock; each
builds a fresh immutable snapshot inside the router, so ``route`` runs without
the lock and sees either the old or the new expert set, never a mix.

Quality weighting: when several experts cover one skill (a LoRA and a compressed
full fine-tune, two versions of an expert), their exemplars look alike and the
router splits its votes between them. ``set_quality`` gives each expert a
measured quality (its calibration score); every score is multiplied by it and
renormalised before the policy decides, so the better-measured expert wins the
skill, as vLLM Semantic Router's KNN weights votes by quality. An expert without
a measured quality counts as 1.0. The decision records the factors it used.

Twins: experts registered with the same exemplar texts (a LoRA and a
compressed full fine-tune of one skill) are one skill to the router, which
splits its votes between them. The policy therefore decides on each twin
group's total score, represented by its best (quality-weighted) member: the
confidence is the skill's, not half of it, and ``top_k > 1`` never merges an
expert with its own twin. ``Decision.scores`` keeps every expert's own score.

Near ties: ``set_preferred`` names experts to prefer (the server prefers those
it serves without a weight swap: the LoRA path). Within a twin group, a
preferred member wins unless the best member's score is more than
``tie_margin`` (default 3 %) above it: calibration scores on 64 examples are
only that precise (one standard error at 94 % is 3 points), and a dense twin
chosen for a 1-point edge costs a weight swap whenever traffic mixes. Outside
twin groups the preference only breaks exact ties (one part in 1e9).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence

from deltaserve.router.base import Decision, Policy, Router


class RoutingService:
    def __init__(self, router: Router, policy: Policy | None = None,
                 clock: Callable[[], float] = time.perf_counter, tie_margin: float = 0.03):
        self.router = router
        self.policy = policy if policy is not None else Policy()
        self._clock = clock
        self._lock = threading.Lock()
        self._quality: dict[str, float] = {}
        self._preferred: frozenset[str] = frozenset()
        self.tie_margin = tie_margin
        self._texts: dict[str, frozenset[str]] = {}   # expert -> its exemplar texts (twins share them)
        self._twins: dict[str, frozenset[str]] = {}   # the same, for experts with a twin only

    def set_quality(self, quality: Mapping[str, float | None]) -> None:
        """``{expert: measured quality}`` (e.g. calibration scores); None or absent counts as 1.0."""
        self._quality = {n: float(q) for n, q in quality.items() if q is not None and q >= 0}

    def set_preferred(self, names) -> None:
        """Experts to prefer: within a twin group, unless another twin scores more than ``tie_margin``
        higher; elsewhere, on exact ties (see the module docstring)."""
        self._preferred = frozenset(names)

    @property
    def name(self) -> str:
        return self.router.name

    @property
    def experts(self) -> tuple[str, ...]:
        """Routable experts (for exemplar routers: those with at least one exemplar)."""
        return self.router.experts

    def set_exemplars(self, exemplars: Mapping[str, Sequence[str]]) -> None:
        """Replace everything: ``{expert: exemplar texts}``; empty lists are dropped
        by the exemplar routers (such experts are not routable)."""
        with self._lock:
            self.router.fit({name: list(texts) for name, texts in exemplars.items()})
            self._texts = {name: frozenset(texts) for name, texts in exemplars.items() if texts}
            self._twins = twin_groups(self._texts)

    def add(self, expert: str, texts: Sequence[str] = ()) -> None:
        """Add exemplars to one expert (or, for exemplar-free routers, the expert itself)."""
        with self._lock:
            self.router.add(expert, list(texts))
            if texts:
                self._texts = {**self._texts, expert: self._texts.get(expert, frozenset()) | frozenset(texts)}
                self._twins = twin_groups(self._texts)

    def remove(self, expert: str) -> None:
        with self._lock:
            self.router.remove(expert)
            self._texts = {n: t for n, t in self._texts.items() if n != expert}
            self._twins = twin_groups(self._texts)

    def route(self, texts: Sequence[str], allowed: Collection[str] | None = None) -> list[Decision]:
        """One decision per text, in order; with ``allowed``, among those experts only (the router never looks
        at the others' exemplars, so neither scores nor distances depend on them)."""
        if isinstance(texts, str):
            raise TypeError("route() takes a sequence of texts, not one string")
        started = self._clock()
        quality = self._quality
        if not texts:
            scored = []
        elif allowed is None:
            scored = self.router.score(list(texts))
        else:
            scored = self.router.score(list(texts), allowed=frozenset(allowed))
        preferred = self._preferred
        weighted = [(tie_broken(quality_weighted(scores, quality), preferred), distance) for scores, distance in scored]
        policy = self.policy
        twins = self._twins
        decided = [policy.decide(twins_collapsed(scores, twins, preferred, self.tie_margin), distance)
                   for scores, distance in weighted]
        latency_s = self._clock() - started
        encoder = getattr(getattr(self.router, "encoder", None), "name", None)
        return [
            Decision(recipe=recipe, router=self.router.name, scores=scores, confidence=confidence,
                     distance=distance, fallback=reason, latency_s=latency_s,
                     quality={n: quality[n] for n in scores if n in quality}, encoder=encoder)
            for (scores, distance), (recipe, confidence, reason) in zip(weighted, decided)
        ]

    def route_one(self, text: str) -> Decision:
        return self.route([text])[0]


def quality_weighted(scores: Mapping[str, float], quality: Mapping[str, float]) -> dict[str, float]:
    """``scores`` times each expert's quality (1.0 when unknown), renormalised to sum to 1."""
    if not quality or not scores:
        return dict(scores)
    raw = {n: s * quality.get(n, 1.0) for n, s in scores.items()}
    total = sum(raw.values())
    return {n: v / total for n, v in raw.items()} if total > 0 else dict(scores)


TIE_BREAK = 1e-9


def tie_broken(scores: dict[str, float], preferred: frozenset[str]) -> dict[str, float]:
    """``scores`` with the preferred experts' raised by one part in 1e9 (decides exact ties only)."""
    if not preferred or not scores:
        return scores
    return {n: s * (1 + TIE_BREAK) if n in preferred else s for n, s in scores.items()}


def twin_groups(texts_of: Mapping[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """``{expert: its exemplar texts}`` for the experts that share their texts with another (twins) only."""
    count: dict[frozenset[str], int] = {}
    for texts in texts_of.values():
        count[texts] = count.get(texts, 0) + 1
    return {name: texts for name, texts in texts_of.items() if count[texts] > 1}


def twins_collapsed(scores: dict[str, float], twins: Mapping[str, frozenset[str]],
                    preferred: frozenset[str] = frozenset(), margin: float = 0.0) -> dict[str, float]:
    """Each group of twins (``twins``: expert -> group, see :func:`twin_groups`) as one member carrying the
    group's total score: its best-scored member (ties: the first name), or a preferred member within
    ``margin`` (relative) of it. Every other expert is its own group and keeps its score."""
    if not twins or twins.keys().isdisjoint(scores):   # most routers have no twins: nothing to collapse
        return scores
    out: dict[str, float] = {}
    members: dict[frozenset[str], list[str]] = {}
    for name, score in scores.items():
        group = twins.get(name)
        if group is None:
            out[name] = score
        else:
            members.setdefault(group, []).append(name)
    for names in members.values():
        best = min(names, key=lambda n: (-scores[n], n))
        near = [n for n in names if n in preferred and scores[n] >= scores[best] * (1 - margin)]
        out[min(near, key=lambda n: (-scores[n], n)) if near else best] = sum(scores[n] for n in names)
    return out
