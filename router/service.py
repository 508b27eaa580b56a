"""RoutingService: one router + one policy, safe to share between request threads.

Mutations (``set_exemplars``/``add``/``remove``) are serialised by a lock; each
builds a fresh immutable snapshot inside the router, so ``route`` runs without
the lock and sees either the old or the new expert set, never a mix.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence

from router.base import Decision, Policy, Router


class RoutingService:
    def __init__(self, router: Router, policy: Policy | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.router = router
        self.policy = policy if policy is not None else Policy()
        self._clock = clock
        self._lock = threading.Lock()

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

    def add(self, expert: str, texts: Sequence[str] = ()) -> None:
        """Add exemplars to one expert (or, for exemplar-free routers, the expert itself)."""
        with self._lock:
            self.router.add(expert, list(texts))

    def remove(self, expert: str) -> None:
        with self._lock:
            self.router.remove(expert)

    def route(self, texts: Sequence[str]) -> list[Decision]:
        """One decision per text, in order."""
        if isinstance(texts, str):
            raise TypeError("route() takes a sequence of texts, not one string")
        started = self._clock()
        scored = self.router.score(list(texts)) if texts else []
        policy = self.policy
        decided = [policy.decide(scores, distance) for scores, distance in scored]
        latency_s = self._clock() - started
        return [
            Decision(recipe=recipe, router=self.router.name, scores=scores, confidence=confidence,
                     distance=distance, fallback=reason, latency_s=latency_s)
            for (scores, distance), (recipe, confidence, reason) in zip(scored, decided)
        ]

    def route_one(self, text: str) -> Decision:
        return self.route([text])[0]
