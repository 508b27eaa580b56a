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

from deltaserve.server.engine.types import ExpertInfo, Plan, WeightState
from deltaserve.server.recipes import Recipe
from deltaserve.server.settings import EngineConfig


def lora_servable(recipe: Recipe, experts: tuple[ExpertInfo, ...], config: EngineConfig) -> bool:
    """Whether ``recipe`` can be one merged LoRA adapter on this engine."""
    rank = sum(i.manifest.rank or 0 for i in experts)
    return (config.enable_lora and recipe.method == "task_arithmetic" and all(i.lowrank for i in experts)
            and rank <= config.lora_rank)


def plan_recipe(recipe: Recipe, experts: Mapping[str, ExpertInfo], config: EngineConfig,
                merged: Callable[[str], bool] = lambda key: False) -> Plan:
    """The plan of ``recipe`` over the servable ``experts``; ``merged(key)``: the adaptive policy serves that
    LoRA recipe from merged weights now. Every expert the recipe names must be in ``experts``."""
    if not recipe.terms:
        return Plan("base", recipe, WeightState())
    infos = tuple(experts[n] for n in recipe.names)
    if lora_servable(recipe, infos, config) and not merged(recipe.key):
        return Plan("lora", recipe, WeightState(), infos)
    return Plan("dense", recipe, WeightState(recipe.key + "|" + ",".join(i.token for i in infos)), infos)
