"""The LoRA path: a plan's merged adapter as a vLLM ``LoRARequest``, pinned while a request uses it.

Adapters are built once per recipe and expert versions (server.engine.adapters writes
them), kept in an LRU of bounded size, and dropped from vLLM when evicted or when an
expert they merge changes. Uncertainty scoring borrows the same cache: a low-rank
expert scores through its own adapter, any other through a rank-``PROXY_RANK`` SVD proxy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltaserve.experts.expert import Expert, ExpertFormatError
from deltaserve.server.engine.adapters import AdapterCache, MergedAdapter
from deltaserve.server.engine.types import ExpertInfo, Plan
from deltaserve.server.exceptions import ExpertUnavailable
from deltaserve.server.metrics import Metrics

log = logging.getLogger("deltaserve")
PROXY_RANK = 16


def lora_request(adapter: MergedAdapter, kind: str = "recipe") -> Any:
    from deltaserve.server.vllm_compat import LoRARequest

    return LoRARequest(f"{kind}-{adapter.lora_id}", adapter.lora_id, str(adapter.path))


class LoraAdapters:
    """The engine's merged adapters: built on demand, pinned per request, evicted by the cache's LRU."""

    def __init__(self, cache: AdapterCache, metrics: Metrics, load: Callable[[ExpertInfo], Expert],
                 base_shapes: dict, base_dir: Path) -> None:
        self.cache, self.metrics, self.load = cache, metrics, load
        self.base_shapes, self.base_dir = base_shapes, base_dir
        self.names: frozenset[str] | None = None   # what vLLM's LoRA adapts on this model (server.worker.layout)
        self.building: dict[str, int] = {}   # recipe key -> requests waiting for its adapter to be built
        self._pending: dict[str, asyncio.Future] = {}   # adapter key -> done when its build in flight ends

    def resident(self) -> list[str]:
        """The recipe keys whose merged adapters are in the cache (scoring proxies left out)."""
        return [k.split("|", 1)[0] for k in self.cache.keys() if not k.startswith("proxy|")]

    async def acquire(self, plan: Plan, llm: Any) -> tuple[Any, MergedAdapter]:
        """The vLLM ``LoRARequest`` of a LoRA-path plan and its adapter, pinned until ``release``. Requests that
        arrive while their adapter is being built wait for that build instead of building it again."""
        key = plan.recipe.key + "|" + ",".join(i.token for i in plan.experts)
        adapter = self.cache.acquire(key)
        if adapter is not None:
            self.metrics.cache_hits.labels("device").inc()
        else:
            recipe = plan.recipe.key
            self.building[recipe] = self.building.get(recipe, 0) + 1
            try:
                adapter = await self._wait_or_build(plan, key, llm)
            finally:
                left = self.building.pop(recipe) - 1
                if left:
                    self.building[recipe] = left
        self.metrics.cache_bytes.labels("device").set(self.cache.nbytes)
        return lora_request(adapter), adapter

    async def _wait_or_build(self, plan: Plan, key: str, llm: Any) -> MergedAdapter:
        while key in self._pending:   # built by an earlier request: it is a hit unless evicted meanwhile
            await asyncio.wait([self._pending[key]])
            adapter = self.cache.acquire(key)
            if adapter is not None:
                self.metrics.cache_hits.labels("device").inc()
                return adapter
        self.metrics.cache_misses.labels("device").inc()
        self._pending[key] = asyncio.get_running_loop().create_future()
        try:
            experts = [self.load(i) for i in plan.experts]
            built = await asyncio.to_thread(
                self.cache.build, key, experts, list(plan.recipe.weights), self.base_shapes, str(self.base_dir),
                self.names)
        except ExpertFormatError as err:
            log.error("building the adapter of %r failed", plan.recipe.key, exc_info=err)
            raise ExpertUnavailable(f"recipe {plan.recipe.key!r} cannot be served: one of its experts failed "
                                    "its checks (see the server log)") from None
        finally:
            self._pending.pop(key).set_result(None)
        fresh, evicted = built   # unpacked here: mypy does not narrow the adapter when unpacking an await
        self.metrics.adapter_builds.inc()
        self.metrics.cache_evictions.labels("device").inc(len(evicted))
        await self.drop(evicted, llm)
        return fresh

    async def acquire_proxy(self, info: ExpertInfo, llm: Any) -> tuple[Any, MergedAdapter]:
        """A pinned rank-``PROXY_RANK`` SVD proxy of a full-rank expert (what uncertainty scoring runs)."""
        key = f"proxy|{info.token}"
        adapter = self.cache.acquire(key)
        if adapter is None:
            built = await asyncio.to_thread(self.cache.build_proxy, key, self.load(info), PROXY_RANK, self.base_shapes,
                                          self.names)
            adapter, evicted = built
            await self.drop(evicted, llm)
        return lora_request(adapter, "proxy"), adapter

    async def release(self, adapter: MergedAdapter | None, llm: Any) -> None:
        if adapter is not None:
            await self.drop(self.cache.release(adapter), llm)

    async def forget(self, name: str, llm: Any) -> None:
        """Drop every adapter that merges expert ``name`` (deleted or replaced)."""
        await self.drop(self.cache.invalidate(name), llm)

    async def drop(self, adapters: list[MergedAdapter], llm: Any) -> None:
        for a in adapters:
            if llm is not None:
                try:
                    await llm.remove_lora(a.lora_id)
                except Exception:  # noqa: BLE001 - not loaded in vLLM (never used or already evicted there)
                    pass
        self.cache.remove_files(adapters)
