"""How a recipe is served, as a pure function: the engine and the tests' fake engine both plan with it.

* **base**   the empty recipe: base weights, no adapter.
* **lora**   every expert low-rank (its codec's ``lowrank`` capability), a linear merge
             (task arithmetic), total rank <= ``max_lora_rank``, and the engine started
             with LoRA support: one exact merged adapter per recipe (server.engine.adapters),
             sent per request; different recipes batch together on the base weights.
* **dense**  anything else (sparse / ternary / dense experts, non-linear merges, ranks
             beyond the LoRA budget, every recipe when the engine runs without LoRA):
             the weights themselves become W_base + merge(tau) (server.worker), one
             recipe at a time (server.engine.scheduler). A LoRA recipe the adaptive policy
             serves merged (server.engine.adaptive) is planned dense too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from deltaserve.server.engine.types import ExpertInfo, Plan, WeightState
from deltaserve.server.recipes import Recipe
from deltaserve.server.settings import EngineConfig


@dataclass(frozen=True)
class LoraSupport:
    """What the running engine's LoRA serves: ``off`` says why it serves none (vLLM cannot run LoRA on this
    model here); ``names`` are the checkpoint tensors it adapts (server.worker.layout; None: not known, any)."""

    off: str = ""
    names: frozenset[str] | None = None


def lora_refusal(recipe: Recipe, experts: tuple[ExpertInfo, ...], config: EngineConfig,
                 support: LoraSupport = LoraSupport()) -> str:
    """Why ``recipe`` cannot be one merged LoRA adapter on this engine; "" when it can."""
    if not config.enable_lora:
        return "the engine runs without LoRA (--lora off)"
    if support.off:
        return support.off
    if recipe.method != "task_arithmetic":
        return f"{recipe.method} is not a linear merge of the experts' factors"
    dense = [i.name for i in experts if not i.lowrank]
    if dense:
        return f"not low-rank: {', '.join(dense)}"
    rank = sum(i.manifest.rank or 0 for i in experts)
    if rank > config.lora_rank:
        return f"the experts' total rank {rank} exceeds the LoRA slots' rank {config.lora_rank} (--max-lora-rank)"
    if support.names is not None:
        for info in experts:
            outside = sorted(n for n in info.manifest.tensors if n not in support.names)
            if outside:
                return f"vLLM's LoRA cannot adapt {outside[0]} on this model (expert {info.name})"
    return ""


def lora_servable(recipe: Recipe, experts: tuple[ExpertInfo, ...], config: EngineConfig,
                  support: LoraSupport = LoraSupport()) -> bool:
    """Whether ``recipe`` can be one merged LoRA adapter on this engine."""
    return not lora_refusal(recipe, experts, config, support)


def plan_recipe(recipe: Recipe, experts: Mapping[str, ExpertInfo], config: EngineConfig,
                merged: Callable[[str], bool] = lambda key: False, support: LoraSupport = LoraSupport()) -> Plan:
    """The plan of ``recipe`` over the servable ``experts``; ``merged(key)``: the adaptive policy serves that
    LoRA recipe from merged weights now. Every expert the recipe names must be in ``experts``. A dense plan
    says why the recipe is not on the LoRA path."""
    if not recipe.terms:
        return Plan("base", recipe, WeightState())
    infos = tuple(experts[n] for n in recipe.names)
    refusal = lora_refusal(recipe, infos, config, support)
    if not refusal and not merged(recipe.key):
        return Plan("lora", recipe, WeightState(), infos)
    reason = refusal or "the adaptive policy serves this LoRA recipe from merged weights while it dominates"
    return Plan("dense", recipe, WeightState(recipe.key + "|" + ",".join(i.token for i in infos)), infos, reason)
