"""Adaptive merge/unmerge: the policy (fake clock) and the switch through the real engine (micro zoo)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deltaserve.server.engine.adaptive import AdaptiveSettings, MergePolicy


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def policy(**settings):
    clock = Clock()
    return MergePolicy(AdaptiveSettings(**settings), clock=clock), clock


def feed(p, clock, keys, dt=0.1, path="lora", tokens=20, seconds=1.0):
    """Requests for ``keys`` (None: the base), the base twice as fast per token as the LoRA path."""
    for k in keys:
        clock.t += dt
        p.arrive(k)
        p.observe_request(path if k else "base", tokens, seconds if k else seconds / 2)


def test_dominant_lora_recipe_merges_and_mixed_traffic_unmerges_with_hysteresis():
    p, clock = policy(min_requests=8, prior_swap_s=0.5, window_requests=100)
    feed(p, clock, ["a"] * 7)
    assert p.merged_key is None                       # fewer than min_requests
    feed(p, clock, ["a"])
    assert p.merged("a") and not p.merged("b") and p.switches == {"merged": 1, "lora": 0}
    feed(p, clock, ["a", "a", None, "a", "a"])        # 12/13 = 0.92: stays
    feed(p, clock, [None, "b"])                       # 12/15 = 0.8 >= exit 0.7: stays merged (hysteresis)
    assert p.merged("a")
    feed(p, clock, [None, "b", None])                 # 12/18 = 0.67 < 0.7: unmerges
    assert p.merged_key is None and p.switches == {"merged": 1, "lora": 1}
    feed(p, clock, ["a"])                             # 13/19 < enter 0.9: stays on LoRA
    assert p.merged_key is None


def test_the_window_forgets_old_traffic():
    p, clock = policy(min_requests=4, window_s=1.0, prior_swap_s=0.0)
    feed(p, clock, [None] * 20, dt=0.01)
    feed(p, clock, ["a"] * 4)
    assert p.merged_key is None                       # 4 of 24
    clock.t += 1.0
    feed(p, clock, ["a"] * 4)                         # the base requests fell out of the window
    assert p.merged("a")


def test_the_window_holds_the_last_window_requests_arrivals():
    p, clock = policy(min_requests=8, window_requests=16, prior_swap_s=0.0)
    feed(p, clock, [None] * 20)
    feed(p, clock, ["a"] * 14)
    assert p.merged_key is None                       # 14 of the last 16
    feed(p, clock, ["a"])
    assert p.merged("a")                              # 15 of the last 16 >= 0.9


def test_cost_model_keeps_the_lora_path_when_swaps_cost_more_than_the_overhead_saves():
    # overhead: LoRA 0.05 s/token vs base 0.04 -> 0.01 s/token; 10 requests x 20 tokens save 2 s per window
    p, clock = policy(min_requests=8, enter_share=0.9, exit_share=0.9)
    feed(p, clock, [None], path="base", seconds=20 * 0.08)
    for _ in range(3):
        p.observe_swap(3.0)                           # measured swaps: 3 s, dearer than the 2 s saved
    feed(p, clock, ["a"] * 10, seconds=20 * 0.05)
    assert p.overhead_per_token() == pytest.approx(0.01) and p.merged_key is None
    assert p.last["benefit_s"] < p.last["cost_s"]
    p2, clock2 = policy(min_requests=8)
    feed(p2, clock2, [None], path="base", seconds=20 * 0.08)
    p2.observe_swap(0.5)
    feed(p2, clock2, ["a"] * 10, seconds=20 * 0.05)
    assert p2.merged("a")


def test_disabled_never_merges_and_settings_are_validated():
    p, clock = policy(enabled=False, min_requests=1, prior_swap_s=0)
    feed(p, clock, ["a"] * 20)
    assert p.merged_key is None and not p.merged("a")
    with pytest.raises(ValidationError, match="exit_share"):
        AdaptiveSettings(enter_share=0.8, exit_share=0.9)
    with pytest.raises(ValidationError):
        AdaptiveSettings(window_s=0)


def test_engine_plans_a_merged_lora_recipe_on_the_dense_path():
    from pathlib import Path
    from types import SimpleNamespace

    from deltaserve.server.engine.core import Engine
    from deltaserve.server.engine.planner import LoraSupport
    from deltaserve.server.engine.types import ExpertInfo
    from deltaserve.server.recipes import Recipe

    manifest = SimpleNamespace(rank=8, codec="lowrank", lowrank=True, sha256={"tensors.safetensors": "ab" * 32},
                               tensors={"w.weight": None})
    info = ExpertInfo("lo", manifest, Path("/nowhere"))
    engine = SimpleNamespace(experts={"lo": info}, config=SimpleNamespace(lora_rank=16, enable_lora=True),
                             adaptive=MergePolicy(AdaptiveSettings(min_requests=2, prior_swap_s=0), clock=Clock()),
                             lora_support=LoraSupport())
    engine.adaptive.observe_request("lora", 10, 1.0)
    recipe = Recipe((("lo", 1.0),))
    assert Engine.plan(engine, recipe, arriving=True).path == "lora"
    plan = Engine.plan(engine, recipe, arriving=True)
    assert plan.path == "dense" and plan.state.weights.startswith(recipe.key + "|")
    assert "adaptive policy" in plan.reason
    assert Engine.plan(engine, Recipe()).path == "base"
    engine.adaptive = MergePolicy(AdaptiveSettings(enabled=False))
    engine.lora_support = LoraSupport(names=frozenset({"other.weight"}))     # vLLM's LoRA does not adapt w
    plan = Engine.plan(engine, recipe, arriving=True)
    assert plan.path == "dense" and plan.reason == "vLLM's LoRA cannot adapt w.weight on this model (expert lo)"
    engine.lora_support = LoraSupport(off="vLLM does not support LoRA for X")
    assert Engine.plan(engine, recipe).reason == "vLLM does not support LoRA for X"
    engine.config.enable_lora = False
    plan = Engine.plan(engine, recipe, arriving=True)
    assert plan.path == "dense" and "--lora off" in plan.reason   # no LoRA kernels: merged weights


def test_uncertainty_router_needs_the_engines_lora_support(tmp_path):
    """--lora off with the uncertainty router (it scores experts through adapters) is refused with the reason."""
    from deltaserve.server.settings import EngineConfig, RouterSettings, ServerSettings

    with pytest.raises(ValidationError, match="uncertainty router .* needs the engine's LoRA support"):
        ServerSettings(store_dir=tmp_path, engine=EngineConfig(base_dir=tmp_path, enable_lora=False),
                       router=RouterSettings(name="uncertainty"))
    assert ServerSettings(store_dir=tmp_path, engine=EngineConfig(base_dir=tmp_path, enable_lora=False),
                          router=RouterSettings(name="knn")).engine.enable_lora is False


def test_switching_paths_never_changes_a_greedy_output(micro_zoo, tmp_path, start_server):
    """Through the real engine: a LoRA recipe served on the LoRA path, then merged once it dominates,
    then unmerged when base traffic mixes in; every greedy answer equals HF on the merged checkpoint."""
    from deltaserve.experts.merge.checkpoint import merge_into_checkpoint
    from deltaserve.experts.store import ExpertStore
    from tests.test_server_engine import QUESTIONS, _hf_greedy_texts

    store = tmp_path / "store"
    ExpertStore(store, micro_zoo.layout.base).import_source("vowels", micro_zoo.layout.lora("count_vowels"))
    merged = tmp_path / "merged"
    merge_into_checkpoint(micro_zoo.layout.base, [store / "vowels"], merged, method="task_arithmetic",
                          weights=[1.0])
    expected = _hf_greedy_texts(merged, micro_zoo.tokenizer, QUESTIONS)
    base_expected = _hf_greedy_texts(micro_zoo.layout.base, micro_zoo.tokenizer, QUESTIONS[:1])
    server = start_server(micro_zoo.layout.base, store,
                          extra=["--adaptive-merge", "on", "--adaptive-option", "min_requests=4",
                                 "--adaptive-option", "window_s=600", "--adaptive-option", "window_requests=8",
                                 "--adaptive-option", "prior_swap_s=0"])
    client = server.client()

    def ask(model, q):
        r = client.post("/v1/chat/completions", json={"model": model, "max_tokens": 10, "temperature": 0,
                                                      "messages": [{"role": "user", "content": q}]})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.json()["deltaserve"]["path"]

    phases = [[ask("vowels", q) for q in QUESTIONS[:3]], [ask("vowels", q) for q in QUESTIONS]]
    for _ in range(2):    # 7/8, 6/8 of the last 8 requests for the recipe: >= exit_share 0.7, stays merged
        assert ask("base", QUESTIONS[0])[0] == base_expected[0]
    for _ in range(2):    # 5/8 < 0.7: unmerged; then 4/8
        assert ask("base", QUESTIONS[0])[0] == base_expected[0]
    phases.append([ask("vowels", q) for q in QUESTIONS])
    metrics = client.get("/metrics").text
    assert [p for _, p in phases[0]] == ["lora"] * 3                  # below min_requests
    assert [p for _, p in phases[1]] == ["dense"] * 4                 # merged once it dominates
    assert [p for _, p in phases[2]] == ["lora"] * 4                  # unmerged after the base traffic
    assert [t for t, _ in phases[0]] == expected[:3]
    assert [t for t, _ in phases[1]] == expected == [t for t, _ in phases[2]]
    assert 'deltaserve_adaptive_switches_total{to="merged"} 1.0' in metrics
    assert 'deltaserve_adaptive_switches_total{to="lora"} 1.0' in metrics


def test_a_70_30_mix_stays_on_lora_while_single_recipe_traffic_merges():
    """Measured-like inputs from the real base on 2 cores: 32 tokens per request, 8 generating at once, LoRA
    0.5 s/token per request vs 0.25 on the base, 4.4 s swaps. A recipe with 70 % of the traffic would pay
    two swaps per run of the other 30 % (more than the LoRA overhead it saves); alone it pays one swap."""
    import random

    def run(keys):
        p, clock = policy()
        for _ in range(3):
            p.observe_swap(4.4)
        for k in keys:
            clock.t += 1.0
            p.arrive(k)
            p.observe_request("lora", 32, 32 * (0.5 if k else 0.25), concurrency=8)
        return p

    rng = random.Random(0)
    mixed = run(["a" if rng.random() < 0.7 else rng.choice(["b", "c", "d"]) for _ in range(200)])
    assert mixed.switches["merged"] == 0 and mixed.merged_key is None
    alone = run(["b", "c", "d"] * 5 + ["a"] * 40)
    assert alone.merged("a") and alone.switches == {"merged": 1, "lora": 0}


def test_a_steady_lone_recipe_merges_once_the_swap_is_spread_over_its_history():
    """Measured on the real base with the grouped LoRA ops: 0.133 vs 0.114 s/token per request, 32 tokens,
    8 generating at once, 0.95 s swaps. One window saves 0.61 s (< one swap); a recipe that keeps the traffic
    for two windows of history pays the swap in over them and merges; a 70/30 mix still does not."""
    import random

    def run(keys):
        p, clock = policy()
        p.observe_swap(0.95)
        p.observe_request("base", 32, 32 * 0.114, concurrency=8)   # the base's speed was measured
        for k in keys:
            clock.t += 0.5
            p.arrive(k)
            p.observe_request("lora", 32, 32 * (0.133 if k else 0.114), concurrency=8)
        return p

    first_window = run(["a"] * 8)
    assert first_window.merged_key is None and first_window.last["benefit_s"] < first_window.last["cost_s"]
    assert run(["a"] * 16).merged("a")
    rng = random.Random(1)
    assert run(["a" if rng.random() < 0.7 else rng.choice(["b", "c", "d"]) for _ in range(200)]).switches == {
        "merged": 0, "lora": 0}


def test_the_tail_of_a_burst_does_not_inflate_the_benefit():
    """Finishes at 7, 6, ..., 1 generating (a burst draining) leave the concurrency estimate at the window's
    largest, so the benefit the next arrival sees is the steady state's, not up to 8x larger."""
    p, clock = policy(prior_swap_s=100.0)       # never merges: only the computed benefit matters here
    p.observe_request("base", 32, 32 * 0.114, concurrency=8)
    feed_at = [("a", 8)] * 8
    for key, generating in feed_at:
        clock.t += 0.5
        p.arrive(key)
        p.observe_request("lora", 32, 32 * 0.133, concurrency=generating)
    p.arrive("a")
    steady = p.last["benefit_s"]
    for generating in range(7, 0, -1):
        p.observe_request("lora", 32, 32 * 0.133, concurrency=generating)
    p.arrive("a")
    assert p.last["benefit_s"] == pytest.approx(steady, rel=0.05)
