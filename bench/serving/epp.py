"""A measurement harness that places requests the way llm-d Router's endpoint picker (EPP) does.

Not a product router: deltaserve writes no load balancer (the Kubernetes inference gateway is one). This
module applies the EPP's documented rules (llm-d/llm-d-router v0.10, ``pkg/epp``) to metrics scraped from
deltaserve replicas, so that bench/serving/gateway.py can measure recipe-affine placement against round robin
without a cluster:

* metrics are read through the custom engine mapping of deploy/gateway/llm-d-router-values.yaml
  (``core-metrics-extractor``'s ``engineConfigs``: queue, running, KV usage and the recipes-info gauge; the
  adapter lists split on commas and trimmed, as the EPP's extractor does);
* ``queue-scorer``: min-max normalised waiting queue over the candidates, ``(max - q) / (max - min)``, 1.0
  for every endpoint when all queues are equal;
* ``kv-cache-utilization-scorer``: ``1 - usage``;
* ``lora-affinity-scorer``: 1.0 when the requested model is running on the endpoint, else 0.8 when
  ``len(running) + len(waiting) < max_lora``, else 0.6 when it is waiting there, else 0.0;
* each score clamped to [0, 1], times its weight from the values file's scheduling profile (1.0 when
  none is given), summed; ``max-score-picker`` takes the highest, ties broken at random (it shuffles first).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
ROUTER_VALUES = REPO / "deploy" / "gateway" / "llm-d-router-values.yaml"


@dataclass
class Endpoint:
    """What the EPP knows of one model server after a scrape."""

    waiting_queue: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    active: set[str] = field(default_factory=set)
    waiting_models: set[str] = field(default_factory=set)
    max_active: int = 0


def picker_config(path: Path = ROUTER_VALUES, engine: str = "deltaserve") -> tuple[dict[str, str], dict[str, float]]:
    """From the llm-d Router values file: the engine's metric mapping and the default profile's scorer weights."""
    values = yaml.safe_load(path.read_text())["router"]["epp"]
    config = yaml.safe_load(values["pluginsCustomConfig"][values["pluginsConfigFile"]])
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    extractor = plugins["core-metrics-extractor"]["parameters"]
    mapping = next(e for e in extractor["engineConfigs"] if e["name"] == engine)
    profile = next(p for p in config["schedulingProfiles"] if p["name"] == "default")
    weights = {plugins[p["pluginRef"]]["type"]: float(p.get("weight", 1.0)) for p in profile["plugins"]
               if plugins[p["pluginRef"]]["type"].endswith("-scorer")}
    return mapping, weights


def _adapters(text: str) -> set[str]:
    return {name.strip() for name in text.split(",") if name.strip()}


def parse_endpoint(text: str, mapping: dict[str, str]) -> Endpoint:
    """One endpoint's metrics from its ``/metrics`` text, through the engine mapping (plain metric names; the
    newest recipes-info series wins, as in the EPP's extractor)."""
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)

    def value(spec: str) -> float:
        found = samples.get(spec, [])
        return float(found[-1].value) if found else 0.0

    endpoint = Endpoint(value(mapping["queuedRequestsSpec"]), value(mapping["runningRequestsSpec"]),
                        value(mapping["kvUsageSpec"]))
    info = sorted(samples.get(mapping["loraSpec"], []), key=lambda s: s.value)
    if info:
        labels = info[-1].labels
        endpoint.active = _adapters(labels.get("running_lora_adapters", ""))
        endpoint.waiting_models = _adapters(labels.get("waiting_lora_adapters", ""))
        endpoint.max_active = int(labels.get("max_lora", "0") or 0)
    return endpoint


def queue_scores(endpoints: Sequence[Endpoint]) -> list[float]:
    queues = [e.waiting_queue for e in endpoints]
    low, high = min(queues), max(queues)
    if high == low:
        return [1.0] * len(endpoints)
    return [(high - q) / (high - low) for q in queues]


def kv_scores(endpoints: Sequence[Endpoint]) -> list[float]:
    return [1.0 - e.kv_usage for e in endpoints]


def lora_affinity_scores(model: str, endpoints: Sequence[Endpoint]) -> list[float]:
    scores = []
    for e in endpoints:
        if model in e.active:
            scores.append(1.0)
        elif len(e.active) + len(e.waiting_models) < e.max_active:
            scores.append(0.8)
        elif model in e.waiting_models:
            scores.append(0.6)
        else:
            scores.append(0.0)
    return scores


SCORERS = {"queue-scorer": lambda model, eps: queue_scores(eps),
           "kv-cache-utilization-scorer": lambda model, eps: kv_scores(eps),
           "lora-affinity-scorer": lora_affinity_scores}


def total_scores(model: str, endpoints: Sequence[Endpoint], weights: dict[str, float]) -> list[float]:
    totals = [0.0] * len(endpoints)
    for scorer, weight in weights.items():
        for i, score in enumerate(SCORERS[scorer](model, endpoints)):
            totals[i] += min(max(score, 0.0), 1.0) * weight
    return totals


def pick(model: str, endpoints: Sequence[Endpoint], weights: dict[str, float], rng: random.Random) -> int:
    """``max-score-picker``: the index of the best endpoint, ties broken at random."""
    totals = total_scores(model, endpoints, weights)
    order = list(range(len(endpoints)))
    rng.shuffle(order)
    return max(order, key=lambda i: totals[i])   # max keeps the first of equals: the shuffled order decides ties
