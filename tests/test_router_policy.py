"""Policy, Decision, registry and the service, with a stub router (no models)."""

from __future__ import annotations

import itertools
import json
import math
import threading
from collections.abc import Mapping, Sequence

import pytest

from deltaserve.experts.registry import UnknownNameError
from deltaserve.router import ROUTERS, Decision, Policy, RoutingService, make_router, quantised_recipe


def reference_grid_recipe(scores: Mapping[str, float], top_k: int, units: int) -> dict[str, float]:
    """Slow reference: among all ways to split ``units`` parts over the top-k experts,
    the one closest (L1) to their normalised scores; ties to the higher-scored expert."""
    ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:top_k]
    target = [v / sum(v for _, v in ranked) * units for _, v in ranked]
    best = None
    for parts in itertools.product(range(units + 1), repeat=len(ranked)):
        if sum(parts) != units:
            continue
        key = (round(sum(abs(p - t) for p, t in zip(parts, target)), 9), [-p for p in parts])
        if best is None or key < best[0]:
            best = (key, parts)
    return {name: p / units for (name, _), p in sorted(zip(ranked, best[1])) if p}


@pytest.mark.parametrize("scores", [
    {"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 0.34, "b": 0.33, "c": 0.33}, {"a": 0.9, "b": 0.06, "c": 0.04},
    {"a": 0.4, "b": 0.35, "c": 0.25}, {"x": 0.61, "y": 0.39}, {"a": 0.2, "b": 0.2, "c": 0.2, "d": 0.2, "e": 0.2},
])
@pytest.mark.parametrize("top_k,grid", [(1, 0.25), (2, 0.25), (3, 0.25), (3, 0.1), (5, 0.5)])
def test_quantised_recipe_is_on_the_grid_and_matches_reference(scores, top_k, grid):
    units = round(1 / grid)
    recipe = quantised_recipe(scores, top_k, units)
    assert list(recipe) == sorted(recipe) and 0 < len(recipe) <= top_k
    assert all(abs(w * units - round(w * units)) < 1e-9 and w > 0 for w in recipe.values())
    assert math.isclose(sum(recipe.values()), 1.0, abs_tol=1e-9)
    assert recipe == pytest.approx(reference_grid_recipe(scores, top_k, units))


def test_quantised_recipe_examples():
    assert quantised_recipe({"b": 0.7, "a": 0.3}, 2, 4) == {"a": 0.25, "b": 0.75}
    assert quantised_recipe({"b": 0.55, "a": 0.45}, 2, 4) == {"a": 0.5, "b": 0.5}
    assert quantised_recipe({"b": 0.9, "a": 0.1}, 2, 4) == {"b": 1.0}  # 0.1 rounds to no part
    assert quantised_recipe({"b": 0.4, "a": 0.6}, 1, 4) == {"a": 1.0}
    assert quantised_recipe({"b": 0.0, "a": 0.0}, 2, 4) == {"a": 1.0}


def test_policy_fallbacks():
    policy = Policy(top_k=2, grid=0.5, min_confidence=0.5, max_distance=0.3, fallback={"safe": 1.0})
    assert policy.decide({"a": 0.8, "b": 0.2}, 0.1) == ({"a": 1.0}, 0.8, None)
    assert policy.decide({"a": 0.8, "b": 0.2}, 0.31) == ({"safe": 1.0}, 0.8, "out_of_distribution")
    assert policy.decide({"a": 0.4, "b": 0.35, "c": 0.25}, 0.1) == ({"safe": 1.0}, 0.4, "low_confidence")
    assert policy.decide({}, None) == ({"safe": 1.0}, 0.0, "no_experts")
    assert policy.decide({"a": 0.8, "b": 0.2}, None)[2] is None  # no distance: no OOD check
    assert Policy(max_distance=None).decide({"a": 1.0}, 9.0) == ({"a": 1.0}, 1.0, None)
    assert Policy().fallback == {} and Policy(fallback={"z": 1, "a": 0}).fallback == {"a": 0.0, "z": 1.0}


@pytest.mark.parametrize("bad", [dict(top_k=0), dict(grid=0.3), dict(grid=0), dict(min_confidence=1.5),
                                 dict(max_distance=-1), dict(fallback={"a": math.nan})])
def test_policy_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="invalid routing policy"):
        Policy(**bad)


def test_decision_json_round_trips():
    d = Decision({"a": 0.75, "b": 0.25}, "knn", {"a": 0.7123456789, "b": 0.2876543211}, 0.7123456789, 0.1234567891,
                 None, 0.0012345678)
    data = json.loads(json.dumps(d.to_json()))
    assert data == {"recipe": {"a": 0.75, "b": 0.25}, "router": "knn", "scores": {"a": 0.712346, "b": 0.287654},
                    "confidence": 0.712346, "distance": 0.123457, "fallback": None, "latency_s": 0.001235,
                    "quality": {}, "encoder": None}
    fallback = Decision({}, "uncertainty", {}, 0.0, None, "no_experts", 0.0).to_json()
    assert fallback["recipe"] == {} and fallback["distance"] is None and fallback["fallback"] == "no_experts"


def test_registry_lists_routers_and_misses_name_them():
    assert set(ROUTERS) == {"knn", "gate", "uncertainty"}
    known = r"unknown router 'nope'; known routers: \['gate', 'knn', 'uncertainty'\]"
    with pytest.raises(UnknownNameError, match=known):
        make_router("nope")
    with pytest.raises(ValueError, match="needs uncertainty_scorer"):
        make_router("uncertainty")


class StubRouter:
    """Scores 1.0 for the expert whose name occurs in the text; distance 0."""

    name = "stub"
    needs_exemplars = True

    def __init__(self):
        self._experts: tuple[str, ...] = ()

    @property
    def experts(self) -> tuple[str, ...]:
        return self._experts

    def fit(self, exemplars: Mapping[str, Sequence[str]]) -> None:
        self._experts = tuple(sorted(n for n, t in exemplars.items() if t))

    def add(self, expert: str, texts: Sequence[str]) -> None:
        if texts:
            self._experts = tuple(sorted({*self._experts, expert}))

    def remove(self, expert: str) -> None:
        self._experts = tuple(n for n in self._experts if n != expert)

    def score(self, texts):
        names = self._experts
        out = []
        for text in texts:
            hits = [n for n in names if n in text] or list(names)
            out.append(({n: 1 / len(hits) for n in hits}, 0.0) if names else ({}, None))
        return out


def test_service_routes_and_follows_add_remove():
    ticks = itertools.count(1.0, 0.5)
    service = RoutingService(StubRouter(), Policy(min_confidence=0.6), clock=lambda: next(ticks))
    service.set_exemplars({"math": ["m"], "code": ["c"], "empty": []})
    assert service.experts == ("code", "math") and service.name == "stub"
    first, second = service.route(["do math", "hello"])
    assert (first.recipe, first.fallback, first.latency_s) == ({"math": 1.0}, None, 0.5)
    assert (second.recipe, second.fallback) == ({}, "low_confidence")
    service.remove("math")
    assert service.route_one("do math").recipe == {"code": 1.0}
    service.add("math", ["m"])
    assert service.route_one("do math").recipe == {"math": 1.0}
    with pytest.raises(TypeError):
        service.route("one string")
    assert service.route([]) == []


def test_service_is_safe_under_concurrent_add_remove():
    service = RoutingService(StubRouter(), Policy(min_confidence=0.0))
    service.set_exemplars({"a": ["x"], "b": ["y"]})
    errors: list[BaseException] = []
    stop = threading.Event()

    def churn():
        for i in range(300):
            service.add(f"e{i % 7}", ["t"])
            service.remove(f"e{(i + 3) % 7}")
        stop.set()

    def route():
        while not stop.is_set():
            try:
                for d in service.route(["a", "b", "e1"]):
                    assert math.isclose(sum(d.recipe.values()), 1.0) and set(d.recipe) <= set(d.scores)
            except Exception as err:  # noqa: BLE001 - collected and re-raised in the main thread
                errors.append(err)
                return

    threads = [threading.Thread(target=churn), *(threading.Thread(target=route) for _ in range(3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_quality_weighting_prefers_the_better_measured_expert_of_one_skill():
    """Two experts with the same exemplars split the votes 0.5/0.5; their measured quality decides."""
    from deltaserve.router.service import quality_weighted

    class Tie:
        name, needs_exemplars, experts = "tie", True, ("dense-v", "lora-v")

        def fit(self, exemplars):
            pass

        def score(self, texts):
            return [({"dense-v": 0.5, "lora-v": 0.5}, 0.1) for _ in texts]

    service = RoutingService(Tie(), Policy(min_confidence=0.3))
    assert service.route_one("x").recipe == {"dense-v": 1.0}          # a tie goes to the first name
    service.set_quality({"dense-v": 0.2, "lora-v": 0.9})
    decision = service.route_one("x")
    assert decision.recipe == {"lora-v": 1.0} and decision.quality == {"dense-v": 0.2, "lora-v": 0.9}
    assert abs(decision.scores["lora-v"] - 0.9 / 1.1) < 1e-9 and decision.to_json()["quality"]["lora-v"] == 0.9
    assert quality_weighted({"a": 0.6, "b": 0.4}, {"a": 1.0}) == {"a": 0.6, "b": 0.4}   # unknown counts as 1.0
    service.set_quality({"dense-v": None, "lora-v": 0.9})
    assert service.route_one("x").recipe == {"dense-v": 1.0}


class CountingRouter(StubRouter):
    """StubRouter that records the size of every ``score`` call (and can fail)."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.calls: list[int] = []
        self.fail = fail

    def score(self, texts):
        self.calls.append(len(texts))
        if self.fail:
            raise TimeoutError("scoring queue full")
        return super().score(texts)


def test_batcher_routes_concurrent_calls_in_one_router_call_each_with_its_own_decision():
    import asyncio

    from deltaserve.router.batcher import RouteBatcher

    router = CountingRouter()
    service = RoutingService(router, Policy(min_confidence=0.0))
    service.set_exemplars({"alpha": ["x"], "beta": ["y"]})
    batcher = RouteBatcher(service, window_s=0.01)
    texts = [("alpha " if i % 3 else "beta ") + str(i) for i in range(32)]
    decisions = asyncio.run(batcher.route_many(texts))
    assert [d.recipe for d in decisions] == [{"alpha": 1.0} if i % 3 else {"beta": 1.0} for i in range(32)]
    assert router.calls == [32] and batcher.batches == 1 and batcher.routed == 32
    assert all(d.latency_s > 0 for d in decisions)

    small = RouteBatcher(service, window_s=0.01, max_batch=10)
    router.calls.clear()
    asyncio.run(small.route_many(texts))
    assert router.calls == [10, 10, 10, 2]


def test_batcher_gives_every_caller_of_a_failed_batch_the_error_and_recovers():
    import asyncio

    from deltaserve.router.batcher import RouteBatcher

    router = CountingRouter(fail=True)
    service = RoutingService(router, Policy(min_confidence=0.0))
    service.set_exemplars({"alpha": ["x"]})
    batcher = RouteBatcher(service, window_s=0.0)

    async def go():
        got = await asyncio.gather(*(batcher.route(f"alpha {i}") for i in range(5)), return_exceptions=True)
        assert all(isinstance(g, TimeoutError) for g in got)
        router.fail = False
        return await batcher.route("alpha again")

    assert asyncio.run(go()).recipe == {"alpha": 1.0}
    with pytest.raises(ValueError):
        RouteBatcher(service, window_s=-1)


def test_exact_ties_go_to_the_preferred_expert_and_nothing_else_changes():
    service = RoutingService(StubRouter(), Policy(min_confidence=0.0))
    service.set_exemplars({"a-dense": ["x"], "a-lora": ["x"], "b": ["y"]})
    tie = service.route_one("a-dense a-lora")          # the stub scores both 0.5
    assert tie.recipe == {"a-dense": 1.0}               # name order decides an unbroken tie
    service.set_preferred(["a-lora"])
    assert service.route_one("a-dense a-lora").recipe == {"a-lora": 1.0}
    assert service.route_one("a-dense a-lora").to_json()["scores"] == {"a-dense": 0.5, "a-lora": 0.5}
    service.set_quality({"a-dense": 0.9, "a-lora": 0.8})   # a measured difference still wins over the preference
    assert service.route_one("a-dense a-lora").recipe == {"a-dense": 1.0}


def test_twins_with_the_same_exemplars_count_as_one_skill_for_confidence_and_top_k():
    service = RoutingService(StubRouter(), Policy(min_confidence=0.6))
    service.set_exemplars({"a-dense": ["x", "z"], "a-lora": ["z", "x"], "b": ["y"]})
    d = service.route_one("a-dense a-lora")               # votes split 0.5 / 0.5 between the twins
    assert d.recipe == {"a-dense": 1.0} and d.fallback is None and d.confidence == pytest.approx(1.0)
    assert d.scores == {"a-dense": 0.5, "a-lora": 0.5}    # each expert's own score is still recorded
    service.remove("a-dense")
    service.add("c", ["x", "z"])                          # a new twin of a-lora
    assert service.route_one("a-lora c").confidence == pytest.approx(1.0)
    two = RoutingService(StubRouter(), Policy(min_confidence=0.0, top_k=2))
    two.set_exemplars({"a-dense": ["x"], "a-lora": ["x"], "b": ["y"]})
    assert two.route_one("a-dense a-lora b").recipe == {"a-dense": 0.75, "b": 0.25}   # never a twin pair


def test_a_preferred_twin_wins_within_the_margin_and_loses_beyond_it():
    service = RoutingService(StubRouter(), Policy(min_confidence=0.0))
    service.set_exemplars({"a-dense": ["x"], "a-lora": ["x"], "b": ["y"]})
    service.set_preferred(["a-lora"])
    service.set_quality({"a-dense": 0.95, "a-lora": 0.937})    # 1.4 % apart: calibration noise
    assert service.route_one("a-dense a-lora").recipe == {"a-lora": 1.0}
    service.set_quality({"a-dense": 0.95, "a-lora": 0.90})     # 5 % apart: measured
    assert service.route_one("a-dense a-lora").recipe == {"a-dense": 1.0}
    strict = RoutingService(StubRouter(), Policy(min_confidence=0.0), tie_margin=0.0)
    strict.set_exemplars({"a-dense": ["x"], "a-lora": ["x"]})
    strict.set_preferred(["a-lora"])
    strict.set_quality({"a-dense": 0.95, "a-lora": 0.937})
    assert strict.route_one("a-dense a-lora").recipe == {"a-dense": 1.0}


def test_batcher_refuses_past_max_pending_with_a_retry_estimate():
    import asyncio

    from deltaserve.router.batcher import RouteBatcher, RouterBusy

    router = CountingRouter()
    service = RoutingService(router, Policy(min_confidence=0.0))
    service.set_exemplars({"alpha": ["x"]})
    batcher = RouteBatcher(service, window_s=0.01, max_batch=4, max_pending=6)
    batcher.last_call_s = 2.0

    async def go():
        waiting = [asyncio.ensure_future(batcher.route(f"alpha {i}")) for i in range(6)]
        await asyncio.sleep(0)
        with pytest.raises(RouterBusy) as busy:
            await batcher.route("alpha 7")
        decided = await asyncio.gather(*waiting)
        return busy.value, decided, await batcher.route("alpha later")

    busy, decided, later = asyncio.run(go())
    assert busy.pending == 6 and busy.retry_after_s == pytest.approx(2.0 * (6 / 4 + 1))
    assert len(decided) == 6 and later.recipe == {"alpha": 1.0}   # the queue drained: accepted again
    with pytest.raises(ValueError):
        RouteBatcher(service, max_pending=0)
