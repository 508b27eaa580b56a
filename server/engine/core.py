"""The engine: one vLLM ``AsyncLLM`` with the base resident, serving each request's plan.

Lifecycle (start, restart after a crash, shutdown, health), the store scan that keeps
``experts`` current, and ``generate``. How a recipe is served is decided by
server.engine.planner; the LoRA path lives in server.engine.lora, the dense path's
weight swap in server.engine.swap, uncertainty scoring in server.engine.scoring.

Each store state followed is frozen out of the cyclic GC (``gc.freeze``): a manifest is ~140 objects, and
at 4,000 experts a full collection took 0.66 s, pausing every thread (bench/scale/experts.py). Frozen objects
are still freed when unreferenced; only a reference cycle alive at a freeze is never collected.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from deltaserve.experts.expert import Expert, ExpertFormatError
from deltaserve.experts.store import ExpertStore
from deltaserve.experts.store_errors import UnknownExpertError
from deltaserve.experts.taskvector import _shapes
from deltaserve.server.coalesce import Coalesced
from deltaserve.server.engine import scoring
from deltaserve.server.engine.adapters import AdapterCache, MergedAdapter, clean_stale_roots, default_adapter_root
from deltaserve.server.engine.adaptive import MergePolicy
from deltaserve.server.engine.lora import LoraAdapters
from deltaserve.server.engine.planner import LoraSupport, lora_servable, plan_recipe
from deltaserve.server.engine.platform import lora_unavailable, parallel_args
from deltaserve.server.engine.scan import Followed, follow_store
from deltaserve.server.engine.scheduler import WeightScheduler
from deltaserve.server.engine.swap import WeightSwap
from deltaserve.server.engine.types import ExpertInfo, Plan, Residency, WeightState, residency
from deltaserve.server.exceptions import EngineUnavailable, ExpertUnavailable, from_vllm
from deltaserve.server.metrics import Metrics
from deltaserve.server.recipes import Recipe
from deltaserve.server.settings import EngineConfig

log = logging.getLogger("deltaserve")
WORKER_EXTENSION = "deltaserve.server.worker.extension.DeltaWorkerExtension"


def prepared_params(params: Any, stream: bool) -> Any:
    """The request's vLLM ``SamplingParams`` with the output kind the caller reads (deltas when streaming)."""
    from deltaserve.server.vllm_compat import RequestOutputKind

    params.output_kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    return params


class Engine:
    def __init__(self, config: EngineConfig, store: ExpertStore, metrics: Metrics) -> None:
        self.config = config = config.resolved(store.root)
        self.store = store
        self.metrics = metrics
        self.llm: Any = None
        self.tokenizer: Any = None
        self.experts: dict[str, ExpertInfo] = {}
        self.unavailable: dict[str, str] = {}   # expert -> why it cannot be served (corrupt, foreign, ...)
        self.generation = -1
        self.restarting = False
        self.restarts = 0
        self.ranks: list[dict] = []   # what each rank's worker runs (its deltaserve_setup answer)
        self.lora_support = LoraSupport()
        root = Path(config.adapter_root or default_adapter_root())
        clean_stale_roots(root)
        cache = AdapterCache(root / f"deltaserve-adapters-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                             config.adapter_cache_size)
        self.lora = LoraAdapters(cache, metrics, self._load, _shapes(config.base_dir), config.base_dir)
        self.adaptive = MergePolicy(config.adaptive, metrics=metrics)
        self.swap = WeightSwap(metrics, self.adaptive, store.version_dir)
        self.scheduler = WeightScheduler(self._apply, max_wait_s=config.max_wait_ms / 1000.0,
                                         initial_state=WeightState())
        self._refresh_lock = asyncio.Lock()
        self._followed = Followed()   # the store as last followed (server.engine.scan)
        self._forced = Coalesced()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        from transformers import AutoTokenizer

        from deltaserve.server.vllm_compat import AsyncEngineArgs, AsyncLLM

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.config.kv_cache_gib))
        c = self.config
        parallel = parallel_args(c.tensor_parallel_size)
        self.tokenizer = AutoTokenizer.from_pretrained(str(c.base_dir))
        off = lora_unavailable(c.base_dir) if c.enable_lora else ""
        if off:
            log.warning("LoRA is off: %s; LoRA experts are served on the dense path", off)
        args = AsyncEngineArgs(
            model=str(c.base_dir), served_model_name=c.served_name, dtype=c.vllm_dtype(), seed=c.seed,
            max_model_len=c.max_model_len, gpu_memory_utilization=c.gpu_memory_utilization,
            enforce_eager=c.enforce_eager, enable_lora=c.enable_lora and not off, max_lora_rank=c.lora_rank,
            max_loras=c.max_loras,
            max_cpu_loras=max(c.max_loras, c.adapter_cache_size), worker_extension_cls=WORKER_EXTENSION, **parallel,
        )
        self.llm = AsyncLLM.from_engine_args(args)
        ranks = await self.llm.collective_rpc("deltaserve_setup", args=(str(c.base_dir), c.host_cache_bytes,
                                                                        os.getpid(), c.plain_weights))
        self.ranks = ranks
        names = ranks[0].get("lora_names")
        self.lora_support = LoraSupport(off, frozenset(names) if names is not None else None)
        self.lora.names = self.lora_support.names
        log.info("engine ready on %d rank(s); dense swaps %s; vLLM fixes applied: %s", len(ranks),
                 "in place" if ranks[0]["swap"] == "in_place" else "through vLLM's reload",
                 ", ".join(ranks[0].get("vllm_patches", [])) or "none (not needed here)")
        await self.refresh()

    async def restart(self) -> None:
        """Replace a dead engine with a new one: waiting requests fail fast (503), the weights start
        from the base again, the store is re-read. Merged adapters stay valid (vLLM reloads them)."""
        self.restarting = True
        try:
            old, self.llm = self.llm, None
            if old is not None:
                try:
                    old.shutdown(timeout=10)
                except Exception:  # noqa: BLE001 - a dead engine may fail to shut down cleanly; it is gone anyway
                    log.warning("shutting down the dead engine failed", exc_info=True)
            self.scheduler.reset(EngineUnavailable("the engine restarted; retry"), WeightState())
            self.swap.weights, self.swap.recipe = "", ""
            self.generation = -1
            await self.start()
            self.restarts += 1
        finally:
            self.restarting = False

    async def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        self.lora.cache.close()

    @property
    def alive(self) -> bool:
        return self.llm is not None and not self.llm.errored and not self.restarting

    async def check_health(self) -> None:
        if self.llm is None:
            raise EngineUnavailable("engine not started")
        await self.llm.check_health()

    # ------------------------------------------------------------------ experts
    async def refresh(self, force: bool = False) -> bool:
        """Re-read the store if its generation moved (or ``force``); returns whether anything may have changed.
        Forced refreshes (after this replica's own writes) share scans (server.coalesce)."""
        if force:
            await self._forced.run(lambda: self._refresh(True))
            return True
        return await self._refresh(False)

    async def _refresh(self, force: bool) -> bool:
        async with self._refresh_lock:
            generation = self.store.generation()
            if generation == self.generation and not force:
                return False
            with self.metrics.store_refresh.labels("engine").time():
                last = Followed(self.experts, self.unavailable, self._followed.stamps, self._followed.cursor)
                self._followed = await asyncio.to_thread(follow_store, self.store, last, generation)
            fresh, broken = self._followed.experts, self._followed.unavailable
            for name, reason in broken.items():
                if self.unavailable.get(name) != reason:
                    log.error("expert %r is not servable: %s", name, reason)
            self.unavailable = broken
            for name, old in self.experts.items():
                if name not in fresh or fresh[name].token != old.token:
                    await self._forget(old)
            self.experts = fresh
            self.generation = generation
            gc.freeze()   # ~140 objects per expert's manifest: keep them out of every full collection (below)
            self.metrics.registered_experts.set(len(fresh))
            self.metrics.store_generation.set(generation)
            self.metrics.cache_bytes.labels("disk").set(sum(e.manifest.bytes for e in fresh.values()))
            return True

    async def _forget(self, info: ExpertInfo) -> None:
        await self.lora.forget(info.name, self.llm)
        if self.alive:
            await self.llm.collective_rpc("deltaserve_forget", args=(info.token,))

    def _load(self, info: ExpertInfo) -> Expert:
        """The expert version ``info`` names (its content token), wherever the store keeps it now."""
        try:
            return self.store.load_version(info.name, info.digest)
        except ExpertFormatError as err:
            self.unavailable[info.name] = str(err)
            log.error("expert %r cannot be served: %s", info.name, err)
            raise ExpertUnavailable(f"expert {info.name!r} cannot be served: its stored data failed its checks "
                                    "(see the server log)") from None

    # ------------------------------------------------------------------ planning and scoring
    def plan(self, recipe: Recipe, *, arriving: bool = False) -> Plan:
        """How ``recipe`` is served now (server.engine.planner); ``arriving``: count a request for it with the
        adaptive policy (server.engine.adaptive), which may serve a dominant LoRA recipe merged. An expert deleted
        after the request named it is a 404, as if it had arrived later."""
        gone = [n for n in recipe.names if n not in self.experts]
        if gone:
            raise UnknownExpertError(f"unknown expert {gone[0]!r}: deleted while the request was being prepared")
        if arriving:
            infos = tuple(self.experts[n] for n in recipe.names)
            lora = bool(recipe.terms) and lora_servable(recipe, infos, self.config, self.lora_support)
            self.adaptive.arrive(recipe.key if lora else None)
        return plan_recipe(recipe, self.experts, self.config, self.adaptive.merged, self.lora_support)

    async def scoring_adapter(self, name: str) -> tuple[Any, MergedAdapter]:
        """A pinned LoRA of ``name`` to score it with: its own merged adapter if it is on the LoRA path, else a
        rank-``PROXY_RANK`` SVD proxy (server.engine.lora)."""
        plan = self.plan(Recipe(((name, 1.0),)))
        if plan.path == "lora":
            return await self.lora.acquire(plan, self.llm)
        return await self.lora.acquire_proxy(self.experts[name], self.llm)

    async def score_answers(self, texts: list[str], experts: list[str]) -> list[list[float]]:
        """Mean NLL of each expert's own greedy answer to each user text (server.engine.scoring)."""
        if self.llm is None:
            raise EngineUnavailable("engine not started")
        return await scoring.score_answers(self, texts, experts)

    # ------------------------------------------------------------------ serving
    async def generate(self, prompt_ids: list[int], params: Any, plan: Plan, request_id: str,
                       stream: bool = False) -> AsyncIterator[Any]:
        """Stream vLLM RequestOutputs for ``prompt_ids`` under ``plan`` with vLLM ``SamplingParams`` ``params``.

        A request with prompt logprobs runs alone (an exclusive state of its own on the plan's weights):
        vLLM-CPU 0.32 computes prompt logits with one LoRA index per *request* in the batch, so any batch of
        two or more requests, one of them with prompt logprobs, dies with an einsum shape mismatch — even
        all-base or all-one-adapter batches (measured; the engine has LoRA enabled). vLLM's own request
        checks (raised before the first output) are 400s.
        """
        from deltaserve.server.vllm_compat import EngineDeadError

        self._require_running()
        params = prepared_params(params, stream)
        state = plan.state
        if params.prompt_logprobs is not None:
            state = WeightState(plan.state.weights, exclusive=f"prompt-logprobs:{request_id}")
        self.metrics.arrivals.labels("true" if self._resident(plan) else "false").inc()
        depth = self.metrics.queue_depth.labels(plan.path)
        depth.inc()
        adapter = None
        try:
            lora, adapter = await self.lora.acquire(plan, self.llm) if plan.path == "lora" else (None, None)
            if plan.path == "dense" or self.scheduler.active != plan.state:
                hit = self.scheduler.active == plan.state
                (self.metrics.cache_hits if hit else self.metrics.cache_misses).labels("device").inc()
            async with self.scheduler.hold(state, plan):
                self._require_running()
                async for output in self._outputs(prompt_ids, params, plan, request_id, lora):
                    yield output
        except EngineDeadError as err:
            raise EngineUnavailable("the engine stopped; it is being restarted, retry shortly") from err
        finally:
            depth.dec()
            await self.lora.release(adapter, self.llm)

    async def _outputs(self, prompt_ids: list[int], params: Any, plan: Plan, request_id: str,
                       lora: Any) -> AsyncIterator[Any]:
        """vLLM's outputs; a refusal before the first one is the request's fault (a 400). A finished request
        feeds the adaptive policy's cost model."""
        from deltaserve.server.vllm_compat import REQUEST_REFUSALS, TokensPrompt

        started, output, admitted = False, None, time.perf_counter()
        try:
            async for output in self.llm.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), params,
                                                  request_id, lora_request=lora):
                started = True
                yield output
        except REQUEST_REFUSALS as err:
            if started:
                raise
            raise from_vllm(err, "vLLM refused the request: ", "sampling") from None
        if output is not None and output.finished:
            self.adaptive.observe_request(plan.path, sum(len(c.token_ids) for c in output.outputs),
                                          time.perf_counter() - admitted, self.scheduler.inflight)

    def _require_running(self) -> None:
        if self.llm is None or self.restarting:
            raise EngineUnavailable("the engine is not running (starting or restarting); retry shortly")

    async def _apply(self, state: WeightState, plan: Plan | None) -> None:
        """Scheduler callback: make the weights match ``state`` (server.engine.swap)."""
        await self.swap.apply(self.llm, lambda: self.alive, state, plan)

    def _resident(self, plan: Plan) -> bool:
        """Whether ``plan`` is served now without a swap or an adapter build."""
        if plan.path == "dense":
            return self.swap.recipe == plan.recipe.key
        return not self.swap.recipe and (plan.path == "base" or plan.recipe.key in self.lora.resident())

    def residency(self) -> Residency:
        """The recipes resident and wanted now, and the requests held and admitted (for the gateway's metrics)."""
        return residency(self.swap.recipe, self.lora, self.scheduler)
