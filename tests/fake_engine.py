"""A fake engine for in-process HTTP tests: the store's experts, the engine's planning, canned outputs.

It implements server.engine.EngineProtocol without vLLM: ``generate`` answers
every prompt with the same few tokens (one per step when streaming), or raises
``fail_with`` to exercise the error paths.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from server.engine import Engine
from server.engine_types import ExpertInfo, Plan
from server.errors import EngineUnavailable
from server.recipes import Recipe

ANSWER = ["fa", "ke"]


class FakeEngine:
    def __init__(self, config: Any, store: Any, tokenizer: Any) -> None:
        self.config, self.store, self.tokenizer = config, store, tokenizer
        self.experts: dict[str, ExpertInfo] = {}
        self.unavailable: dict[str, str] = {}
        self.generation = -1
        self.started = False
        self.restarting = False
        self.restarts = 0
        self.fail_with: Exception | None = None
        self.calls: list[dict] = []

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
        self.experts = {}
        for name in self.store.names():
            expert = self.store.load(name)
            self.experts[name] = ExpertInfo(name, expert.manifest, expert.directory)
        self.generation = generation
        return True

    def plan(self, recipe: Recipe) -> Plan:
        return Engine.plan(self, recipe)   # the real planning rules

    async def generate(self, prompt_ids: list[int], sampling: dict, plan: Plan, request_id: str,
                       stream: bool = False):
        self.calls.append({"prompt_ids": prompt_ids, "sampling": sampling, "plan": plan, "stream": stream})
        if self.fail_with is not None:
            raise self.fail_with
        n = sampling.get("n", 1)
        steps = ANSWER if stream else ["".join(ANSWER)]
        for i, text in enumerate(steps):
            done = i == len(steps) - 1
            outputs = [SimpleNamespace(index=j, text=text, token_ids=[7] * (len(ANSWER) if not stream else 1),
                                       finish_reason="length" if done else None) for j in range(n)]
            yield SimpleNamespace(outputs=outputs, prompt_token_ids=prompt_ids)

    async def score_answers(self, texts: list[str], experts: list[str]) -> list[list[float]]:
        return [[1.0] * len(experts) for _ in texts]
