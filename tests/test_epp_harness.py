"""bench/serving/epp.py, the gateway benchmark's placement harness, reproduces llm-d Router's endpoint-picker
scores (llm-d/llm-d-router v0.10 pkg/epp: lora-affinity, queue and KV-cache scorers, the max-score picker) on
scenario tables, and reads deltaserve's /metrics through the values file's engine mapping."""

from __future__ import annotations

import random

import pytest

from bench.serving import epp
from deltaserve.server.engine.types import Residency
from deltaserve.server.metrics import Metrics


def ep(active=(), waiting=(), max_active=4, queue=0.0, kv=0.0) -> epp.Endpoint:
    return epp.Endpoint(queue, 0.0, kv, set(active), set(waiting), max_active)


@pytest.mark.parametrize("endpoint,score", [
    (ep(active=["a"], max_active=1), 1.0),                       # resident wins even when full
    (ep(active=["b"], max_active=4), 0.8),                       # a free slot
    (ep(active=["b", "c"], waiting=["d"], max_active=3), 0.0),   # running + waiting fill the slots: not free
    (ep(active=["b", "c"], waiting=["a"], max_active=3), 0.6),   # full, the model already queued here
    (ep(active=["b"], waiting=["a"], max_active=4), 0.8),        # a free slot is checked before waiting
    (ep(max_active=0), 0.0),                                     # no recipes-info metric: max_lora 0
])
def test_lora_affinity_scores(endpoint, score):
    assert epp.lora_affinity_scores("a", [endpoint]) == [score]


@pytest.mark.parametrize("queues,scores", [
    ([0, 5, 10], [1.0, 0.5, 0.0]), ([3, 3], [1.0, 1.0]), ([2, 1], [0.0, 1.0]), ([7], [1.0]),
])
def test_queue_scores_are_min_max_normalised(queues, scores):
    assert epp.queue_scores([ep(queue=q) for q in queues]) == scores


def test_kv_scores_and_weighted_totals():
    endpoints = [ep(active=["a"], queue=4, kv=0.1), ep(queue=0, kv=0.0)]
    assert epp.kv_scores(endpoints) == [0.9, 1.0]
    weights = {"queue-scorer": 1.0, "kv-cache-utilization-scorer": 1.0, "lora-affinity-scorer": 6.0}
    assert epp.total_scores("a", endpoints, weights) == pytest.approx([0.0 + 0.9 + 6.0, 1.0 + 1.0 + 4.8])
    assert epp.pick("a", endpoints, weights, random.Random(0)) == 0       # affinity outweighs the queue
    assert epp.pick("b", endpoints, weights, random.Random(0)) == 1       # elsewhere the queue decides


def test_ties_are_broken_at_random():
    endpoints = [ep(), ep()]
    picks = {epp.pick("a", endpoints, {"queue-scorer": 1.0}, random.Random(seed)) for seed in range(20)}
    assert picks == {0, 1}


def test_scrape_through_the_values_files_engine_mapping():
    mapping, weights = epp.picker_config()
    assert set(weights) == {"queue-scorer", "kv-cache-utilization-scorer", "lora-affinity-scorer"}
    metrics = Metrics()
    metrics.watch(lambda: Residency(("tone", "support-bot", "ties(density=0.3;seed=1):a+b"), ("sql",), 33, 2, 5))
    text = metrics.render().decode() + "vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.25\n"
    endpoint = epp.parse_endpoint(text, mapping)
    assert endpoint == epp.Endpoint(2.0, 5.0, 0.25, {"tone", "support-bot", "ties(density=0.3;seed=1):a+b"},
                                    {"sql"}, 33)
    spaced = text.replace('running_lora_adapters="tone,', 'running_lora_adapters=" tone, ')
    assert "tone" in epp.parse_endpoint(spaced, mapping).active   # names are trimmed, as the EPP does
