"""A fake engine for in-process HTTP tests: the store's experts, the engine's planning, canned outputs.

It implements server.engine.EngineProtocol without running vLLM: ``generate``
answers every prompt with the same few tokens (one per step when streaming),
with made-up logprobs and prompt logprobs when the ``SamplingParams`` ask for
them, or raises ``fail_with`` to exercise the error paths.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from deltaserve.server.engine.adaptive import AdaptiveSettings, MergePolicy
from deltaserve.server.engine.planner import plan_recipe
from deltaserve.server.engine.scan import Followed, follow_store
from deltaserve.server.engine.types import ExpertInfo, Plan, Residency
from deltaserve.server.exceptions import EngineUnavailable
from deltaserve.server.recipes import Recipe

ANSWER = ["fa", "ke"]
ANSWER_IDS = [7, 8]
LOGPROB = -0.5


def _step(token_id: int, top: int | None) -> dict:
    """One position's logprobs: the token itself, then ``top`` made-up alternatives."""
    from vllm.logprobs import Logprob

    step = {token_id: Logprob(LOGPROB, 1, None)}
    others = [t for t in range(40, 40 + (top or 0) + 1) if t != token_id][:top or 0]
    for k, other in enumerate(others):
        step[other] = Logprob(LOGPROB - 1 - k, 2 + k, None)
    return step


class FakeEngine:
    def __init__(self, config: Any, store: Any, tokenizer: Any) -> None:
        self.config, self.store, self.tokenizer = config.resolved(store.root), store, tokenizer
        self.experts: dict[str, ExpertInfo] = {}
        self.unavailable: dict[str, str] = {}
        self._followed = Followed()
        self.generation = -1
        self.started = False
        self.restarting = False
        self.restarts = 0
        self.fail_with: Exception | None = None
        self.calls: list[dict] = []
        self.adaptive = MergePolicy(AdaptiveSettings(enabled=False))   # tests of the policy build their own

    async def start(self) -> None:
        self.started = True
        await self.refresh()

    async def shutdown(self) -> None:
        self.started = False

    async def restart(self) -> None:
        self.restarts += 1
        await self.start()

    @property
    def alive(self) -> bool:
        return self.started

    async def check_health(self) -> None:
        if not self.started:
            raise EngineUnavailable("engine not started")

    async def refresh(self, force: bool = False) -> bool:
        generation = self.store.generation()
        if generation == self.generation and not force:
            return False
        self._followed = follow_store(self.store, self._followed, generation)
        self.experts, self.unavailable = self._followed.experts, self._followed.unavailable
        self.generation = generation
        return True

    def plan(self, recipe: Recipe, *, arriving: bool = False) -> Plan:
        return plan_recipe(recipe, self.experts, self.config)   # the real planning rules

    def residency(self) -> Residency:
        return Residency()   # nothing is ever resident here: the metrics contract is tested on the real engine


    async def generate(self, prompt_ids: list[int], params: Any, plan: Plan, request_id: str,
                       stream: bool = False):
        self.calls.append({"prompt_ids": prompt_ids, "params": params, "plan": plan, "stream": stream})
        if self.fail_with is not None:
            raise self.fail_with
        pieces = list(zip(ANSWER, ([i] for i in ANSWER_IDS))) if stream else [("".join(ANSWER), ANSWER_IDS)]
        prompt_lp = None
        if params.prompt_logprobs is not None:
            prompt_lp = [None] + [_step(t, params.prompt_logprobs) for t in prompt_ids[1:]]
        for i, (text, ids) in enumerate(pieces):
            done = i == len(pieces) - 1
            lps = [_step(t, params.logprobs) for t in ids] if params.logprobs is not None else None
            outputs = [SimpleNamespace(index=j, text=text, token_ids=list(ids), logprobs=lps, stop_reason=None,
                                       finish_reason="length" if done else None) for j in range(params.n)]
            yield SimpleNamespace(outputs=outputs, prompt_token_ids=prompt_ids,
                                  prompt_logprobs=prompt_lp if i == 0 or not stream else None)

    async def score_answers(self, texts: list[str], experts: list[str]) -> list[list[float]]:
        return [[1.0] * len(experts) for _ in texts]
