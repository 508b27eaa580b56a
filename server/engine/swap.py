"""The dense path's weight swap: drain, rewrite the weights on every rank, reset the prefix cache, resume.

The scheduler (server.engine.scheduler) calls ``WeightSwap.apply`` between recipes;
the worker extension (server.worker) computes W_base + merge(tau) next to the
weights. Each phase is timed (``Laps``) and recorded with the worker's own phases.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltaserve.server.engine.adaptive import MergePolicy
from deltaserve.server.engine.contracts import MergeRequest, SwapStats
from deltaserve.server.engine.types import Plan, WeightState
from deltaserve.server.exceptions import EngineUnavailable, ExpertUnavailable
from deltaserve.server.metrics import Metrics

log = logging.getLogger("deltaserve")


class Laps:
    """Wall-clock phases of one operation: ``lap(name)`` records the seconds since the previous lap."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self.last
        self.last = now

    @property
    def total(self) -> float:
        return self.last - self.start


class WeightSwap:
    """What the worker's weights hold, and how to make them hold another recipe."""

    def __init__(self, metrics: Metrics, adaptive: MergePolicy, version_dir: Callable[[str, str], Path]) -> None:
        self.metrics, self.adaptive, self.version_dir = metrics, adaptive, version_dir
        self.weights = ""          # what the worker's weights hold ("" = the base, "?" = unknown)
        self.recipe = ""           # the key of the dense recipe they hold ("" = the base, or unknown)

    async def apply(self, llm: Any, alive: Callable[[], bool], state: WeightState, plan: Plan | None) -> None:
        """Make the weights match ``state`` (drain, rewrite, reset prefix cache); nothing if they do."""
        if state.weights == self.weights:
            return
        laps = Laps()
        request = self.merge_request(plan) if plan is not None and state.weights else MergeRequest()
        await llm.pause_generation(mode="wait", clear_cache=True)
        laps.lap("drain")
        try:
            raw = await llm.collective_rpc("deltaserve_apply", args=(request.model_dump(),))
            laps.lap("rpc")
            await llm.reset_prefix_cache()
            laps.lap("prefix_reset")
        except Exception as err:
            self.weights, self.recipe = "?", ""   # unknown: the next apply rewrites from the base whatever it targets
            if not alive():
                raise EngineUnavailable("the engine stopped while applying a recipe; retry shortly") from err
            log.error("applying recipe %r failed", request.key, exc_info=err)
            raise ExpertUnavailable(f"recipe {request.key!r} could not be applied: one of its experts failed "
                                    "its checks (see the server log)") from err
        finally:
            if alive():
                await llm.resume_generation()
                laps.lap("resume")
        self.weights, self.recipe = state.weights, request.key
        stats = slowest_rank(raw, request.key)
        laps.phases["rpc"] -= sum(stats.phases.values())   # the RPC's own overhead: round trip minus the worker's
        self.adaptive.observe_swap(laps.total)
        self.metrics.record_swap(stats, laps.total, len(request.items), {**laps.phases, **stats.phases})

    def merge_request(self, plan: Plan) -> MergeRequest:
        """The plan's merge with each expert at the folder of the exact version it was planned with."""
        request = plan.merge_request()
        items = tuple(item.model_copy(update={"path": str(self.version_dir(info.name, info.digest))})
                      for item, info in zip(request.items, plan.experts))
        return request.model_copy(update={"items": items})


def slowest_rank(raw: list[dict], key: str) -> SwapStats:
    """``collective_rpc`` answers once per rank: every rank must have applied the same recipe; the swap took
    as long as its slowest rank."""
    stats = [SwapStats.model_validate(r) for r in raw]
    if not stats:
        raise RuntimeError(f"no worker answered the swap to {key!r}")
    if any(s.key != key for s in stats):
        raise RuntimeError(f"the workers applied different recipes: {sorted({s.key for s in stats})}, not {key!r}")
    return max(stats, key=lambda s: s.seconds)
