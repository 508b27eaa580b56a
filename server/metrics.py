"""Prometheus metrics: every name is ``deltaserve_``-prefixed and listed in docs/operations.md.

One ``Metrics`` object per server owns its own ``CollectorRegistry`` (so tests
can run several servers in one process). Label values are bounded: ``path`` is
one of PATHS, ``tier`` one of TIERS, ``status`` an HTTP status code, ``model``
what the client asked for when it names a known model (otherwise
``"expression"`` or ``"other"``), ``recipe`` the canonical recipe string of a
served request, ``expert`` a routed expert; the first ``label_values`` distinct
models, recipes and experts get their own series and later ones count as
``"other"`` (``LabelBudget``), so a store of 10,000 experts or a stream of
ad-hoc expressions cannot grow Prometheus' series without bound.

This module is the contract for deploy/ (Grafana dashboard, alert rules) and for
the Kubernetes inference gateway's endpoint picker (``GatewayCollector``: GIE's
Model Server Protocol, read through the custom engine mapping in
helm/deltaserve/files/llm-d-router-values.yaml): renaming a metric here means
updating those. ``/metrics`` also passes on vLLM's own ``vllm:`` metrics
(``VllmCollector``), KV-cache usage among them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PATHS = ("base", "dense", "lora")
TIERS = ("device", "host", "disk")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


SWAP_PHASES = ("drain", "rpc", "decode", "merge", "load", "retie", "prefix_reset", "resume")


OTHER = "other"


class LabelBudget:
    """The first ``limit`` distinct values of a label keep their own series; later ones map to ``"other"``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.kept: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.kept:
            return value
        if len(self.kept) >= self.limit:
            return OTHER
        self.kept.add(value)
        return value


class Metrics:
    def __init__(self, label_values: int = 100) -> None:
        self.models, self.recipes, self.experts = (LabelBudget(label_values) for _ in range(3))
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "deltaserve_requests", "Inference requests by requested model, served recipe and HTTP status",
            ["model", "recipe", "status"], registry=r)
        self.latency = Histogram(
            "deltaserve_request_latency_seconds", "End-to-end latency of inference requests",
            ["path"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(
            "deltaserve_time_to_first_token_seconds", "Time from request arrival to the first generated token",
            ["path"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(
            "deltaserve_prompt_tokens", "Prompt tokens processed", ["path"], registry=r)
        self.generated_tokens = Counter(
            "deltaserve_generated_tokens", "Completion tokens generated", ["path"], registry=r)
        self.queue_depth = Gauge(
            "deltaserve_queue_depth", "Requests waiting or running, per serving path", ["path"], registry=r)
        self.swaps = Counter(
            "deltaserve_weight_swaps", "Dense-path weight swaps (recipe changes applied in place)", registry=r)
        self.swap_seconds = Histogram(
            "deltaserve_weight_swap_seconds", "Time to drain the engine and apply one dense recipe (dense-path swap)",
            buckets=LATENCY_BUCKETS, registry=r)
        self.swap_bytes = Counter(
            "deltaserve_weight_swap_bytes", "Bytes of base weights rewritten by dense swaps", registry=r)
        self.adapter_builds = Counter(
            "deltaserve_merged_adapter_builds", "Merged LoRA adapters built for a recipe (LoRA path)", registry=r)
        self.cache_hits = Counter("deltaserve_cache_hits", "Cache hits by tier", ["tier"], registry=r)
        self.cache_misses = Counter("deltaserve_cache_misses", "Cache misses by tier", ["tier"], registry=r)
        self.cache_evictions = Counter("deltaserve_cache_evictions", "Cache evictions by tier", ["tier"], registry=r)
        self.cache_bytes = Gauge("deltaserve_cache_bytes", "Bytes held by tier", ["tier"], registry=r)
        self.engine_up = Gauge("deltaserve_engine_up", "1 while the vLLM engine is alive, else 0", registry=r)
        self.engine_restarts = Counter("deltaserve_engine_restarts", "Engine restarts after the engine died",
                                       registry=r)
        self._store_metrics(r)
        self._routing_metrics(r)
        self._swap_phase_metrics(r)
        self._adaptive_metrics(r)
        self._affinity_metrics(r)
        self._tenant_metrics(r)
        for path in PATHS:
            self.queue_depth.labels(path)
            self.latency.labels(path)
            self.ttft.labels(path)
        for tier in TIERS:
            for family in (self.cache_hits, self.cache_misses, self.cache_evictions, self.cache_bytes):
                family.labels(tier)

    def _tenant_metrics(self, r: CollectorRegistry) -> None:
        # one series per tenant of the key file (bounded by it); no expert names
        self.tenant_requests = Counter("deltaserve_tenant_requests", "API requests admitted, per tenant (--key-file)",
                                       ["tenant"], registry=r)
        self.tenant_tokens = Counter("deltaserve_tenant_tokens", "Prompt + completion tokens, per tenant",
                                     ["tenant"], registry=r)
        self.tenant_rejections = Counter("deltaserve_tenant_rejections",
                                         "Requests refused with 429, per tenant and limit (rpm, tpm, in_flight)",
                                         ["tenant", "limit"], registry=r)

    def _store_metrics(self, r: CollectorRegistry) -> None:
        self.registered_experts = Gauge("deltaserve_registered_experts", "Experts in the store", registry=r)
        self.store_generation = Gauge("deltaserve_store_generation", "Store generation counter", registry=r)
        self.store_refresh = Histogram(
            "deltaserve_store_refresh_seconds", "Following a store change: the engine's store scan, the router's refit",
            ["part"], buckets=(0.001, 0.005, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r)
        for part in ("engine", "router"):
            self.store_refresh.labels(part)

    def _routing_metrics(self, r: CollectorRegistry) -> None:
        """Routing of `model: auto`: decisions, confidence, fallbacks, latency."""
        self.route_decisions = Counter(
            "deltaserve_route_decisions",
            "Routing decisions by router and chosen expert (fallback recipes as 'fallback')",
            ["router", "expert"], registry=r)
        self.route_confidence = Histogram(
            "deltaserve_router_confidence", "Router confidence of each decision", ["router"],
            buckets=CONFIDENCE_BUCKETS, registry=r)
        self.route_fallbacks = Counter(
            "deltaserve_route_fallbacks", "Requests routed to the fallback recipe, by reason",
            ["router", "reason"], registry=r)
        self.router_latency = Histogram(
            "deltaserve_router_latency_seconds", "Time to route one request", ["router"],
            buckets=FAST_BUCKETS, registry=r)

    def _swap_phase_metrics(self, r: CollectorRegistry) -> None:
        """Where a dense-path swap's time goes (server.engine records it)."""
        self.swap_phase_seconds = Counter(
            "deltaserve_weight_swap_phase_seconds", "Seconds spent in each part of the dense-path swaps: drain, "
            "rpc (round trip overhead), decode, merge, load (reload_weights), retie, prefix_reset, resume",
            ["phase"], registry=r)
        for phase in SWAP_PHASES:   # exposed from the start, like every labelled series here
            self.swap_phase_seconds.labels(phase)

    def _adaptive_metrics(self, r: CollectorRegistry) -> None:
        """Adaptive merge/unmerge (server.engine.adaptive)."""
        self.adaptive_merged = Gauge(
            "deltaserve_adaptive_merged", "1 while a LoRA recipe is served from merged weights", registry=r)
        self.adaptive_switches = Counter(
            "deltaserve_adaptive_switches", "Adaptive path switches, to 'merged' or back to 'lora'", ["to"],
            registry=r)
        self.adaptive_overhead = Gauge(
            "deltaserve_adaptive_lora_overhead_seconds_per_token",
            "Measured LoRA-path overhead per output token (the adaptive policy's benefit input)", registry=r)
        for to in ("merged", "lora"):
            self.adaptive_switches.labels(to)

    def _affinity_metrics(self, r: CollectorRegistry) -> None:
        """Whether requests find their recipe resident (the gateway's scraped metrics: GatewayCollector)."""
        self.arrivals = Counter(
            "deltaserve_recipe_arrivals", "Requests by whether their recipe was resident when they arrived "
            "(served without a swap or an adapter build): the affinity hit rate behind a gateway", ["resident"],
            registry=r)
        for resident in ("true", "false"):
            self.arrivals.labels(resident)

    def count_request(self, model: str, recipe: str, status: str) -> None:
        self.requests.labels(self.models(model), self.recipes(recipe), status).inc()

    def count_route(self, router: str, expert: str) -> None:
        self.route_decisions.labels(router, expert if expert == "fallback" else self.experts(expert)).inc()

    def record_swap(self, stats: Any, seconds: float, n_items: int, phases: dict[str, float]) -> None:
        """One dense-path swap: its ``server.engine.contracts.SwapStats``, wall seconds, experts merged, and phases."""
        self.swaps.inc()
        self.swap_seconds.observe(seconds)
        self.swap_bytes.inc(stats.bytes)
        for phase, s in phases.items():
            self.swap_phase_seconds.labels(phase).inc(max(s, 0.0))
        self.cache_hits.labels("host").inc(stats.host_hits)
        self.cache_misses.labels("host").inc(stats.host_misses)
        self.cache_evictions.labels("host").inc(stats.host_evictions)
        self.cache_bytes.labels("host").set(stats.host_bytes)
        if stats.host_misses:
            self.cache_hits.labels("disk").inc(n_items)

    def watch(self, residency: Callable[[], Any]) -> None:
        """Expose what the gateway reads, from ``residency()`` (a server.engine.types.Residency) at each scrape,
        and vLLM's own metrics."""
        self.registry.register(GatewayCollector(residency))
        self.registry.register(VllmCollector())

    def render(self) -> bytes:
        return generate_latest(self.registry)


#: The recipes-info gauge: ``vllm:lora_requests_info``'s shape, with recipe IDs for adapter names.
RECIPES_INFO = "deltaserve_recipe_requests_info"
WAITING = "deltaserve_num_requests_waiting"
RUNNING = "deltaserve_num_requests_running"


class GatewayCollector:
    """The Model Server Protocol's metrics, computed at each scrape (exactly one series each).

    * ``deltaserve_recipe_requests_info`` (gauge, value: the time of this snapshot, as vLLM's
      ``vllm:lora_requests_info``): ``running_lora_adapters`` the resident recipe IDs, comma-separated,
      ``waiting_lora_adapters`` the recipes requests wait for, ``max_lora`` how many can be resident;
    * ``deltaserve_num_requests_waiting`` / ``deltaserve_num_requests_running``: requests held in
      deltaserve's scheduler (for a swap or an adapter) / admitted to the engine.
    """

    def __init__(self, residency: Callable[[], Any]) -> None:
        self.residency = residency

    def describe(self) -> list[Metric]:
        return []   # nothing to check at registration: the names are fixed and the values come per scrape

    def collect(self) -> Iterator[Metric]:
        r = self.residency()
        info = GaugeMetricFamily(RECIPES_INFO, "Recipes resident and waiting (the shape of vllm:lora_requests_info, "
                                 "recipe IDs for adapter names)",
                                 labels=["max_lora", "waiting_lora_adapters", "running_lora_adapters"])
        info.add_metric([str(r.slots), ",".join(r.waiting), ",".join(r.running)], time.time())
        yield info
        yield GaugeMetricFamily(WAITING, "Requests held in deltaserve's scheduler (for a weight swap or an adapter)",
                                value=r.waiting_requests)
        yield GaugeMetricFamily(RUNNING, "Requests admitted to the engine", value=r.running_requests)


class VllmCollector:
    """vLLM's own metrics (``vllm:*``, e.g. ``vllm:kv_cache_usage_perc``, ``vllm:cache_config_info``), which
    vLLM's stat logger registers in prometheus_client's default registry."""

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            if family.name.startswith("vllm:"):
                yield family
