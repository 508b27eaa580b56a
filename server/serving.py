"""Serving one OpenAI request: prompt -> token ids, recipe -> engine plan, outputs -> response or SSE stream.

Completions and chat completions share everything but the prompt rendering and
the shape of a choice, which ``_choice`` builds for both (final and streamed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from router.text import route_text
from server.engine_types import Plan
from server.errors import APIError, describe, error_body, status_of
from server.protocol import ChatCompletionRequest, CompletionRequest, ServedAs, completion_id, now
from server.recipes import Recipe
from server.service import Service

log = logging.getLogger("deltaserve")
RECIPE_HEADER = "x-deltaserve-recipe"
DEFAULT_COMPLETION_TOKENS = 16


async def completions(service: Service, req: CompletionRequest) -> Response:
    _reject_unsupported(req)
    prompts = req.prompts
    recipe, route = await service.resolve(req.model, route_text(prompt=prompts[0], markup=service.markup))
    tok = service.engine.tokenizer
    ids = await asyncio.to_thread(lambda: [tok(p, add_special_tokens=True)["input_ids"] for p in prompts])
    max_tokens = req.max_tokens or req.max_completion_tokens or DEFAULT_COMPLETION_TOKENS
    return await serve(service, req, recipe, route, ids, max_tokens, chat=False)


async def chat_completions(service: Service, req: ChatCompletionRequest) -> Response:
    _reject_unsupported(req)
    messages = req.plain_messages()
    recipe, route = await service.resolve(req.model, route_text(messages=messages))
    ids = await asyncio.to_thread(chat_ids, service.engine.tokenizer, messages)
    limit = service.settings.engine.max_model_len
    max_tokens = req.max_completion_tokens or req.max_tokens or max(1, limit - len(ids))
    return await serve(service, req, recipe, route, [ids], max_tokens, chat=True)


def chat_ids(tokenizer: Any, messages: list[dict]) -> list[int]:
    """The prompt a chat renders to with the model's own template, ready for the assistant's turn."""
    if messages[-1]["role"] == "assistant":
        raise APIError(400, "the last message must not be from the assistant", "messages")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as err:  # noqa: BLE001 - template errors are the client's input
        raise APIError(400, f"cannot render these messages with the model's chat template: {err}",
                       "messages") from None
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _reject_unsupported(req) -> None:
    if bad := req.unsupported():
        raise APIError(400, f"not supported by deltaserve: {bad}", bad[0])


async def serve(service: Service, req, recipe: Recipe, route: dict | None, prompt_ids: list[list[int]],
                max_tokens: int, *, chat: bool) -> Response:
    limit = service.settings.engine.max_model_len
    for ids in prompt_ids:
        if len(ids) + max_tokens > limit:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {limit} tokens", "max_tokens")
    plan = service.engine.plan(recipe)
    call = _Call(service, req, plan, prompt_ids, req.sampling(max_tokens), chat)
    headers = {RECIPE_HEADER: call.label}
    if req.stream:
        return StreamingResponse(call.stream(), media_type="text/event-stream", headers=headers)
    body = await call.final()
    body["deltaserve"] = ServedAs(recipe=call.label, path=plan.path, weights=dict(recipe.terms),
                                  method=recipe.method, options=recipe.option_dict, route=route).model_dump()
    return JSONResponse(body, headers=headers)


def _choice(chat: bool, stream: bool, index: int, text: str, finish_reason: str | None, first: bool) -> dict:
    """One choice of any response shape: completion text, chat message, or chat delta."""
    if not chat:
        return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}
    if not stream:
        return {"index": index, "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason, "logprobs": None}
    delta: dict[str, str] = {"role": "assistant"} if first else {}
    if text or first:
        delta["content"] = text
    return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}


class _Call:
    """One request's run through the engine: its id, timing, token counts and metrics."""

    def __init__(self, service: Service, req, plan: Plan, prompt_ids: list[list[int]], sampling: dict,
                 chat: bool) -> None:
        self.service, self.req, self.plan, self.prompt_ids = service, req, plan, prompt_ids
        self.sampling, self.chat = sampling, chat
        self.rid = completion_id("chatcmpl" if chat else "cmpl")
        self.label = plan.recipe.label(service.base_name)
        self.model_label = service.model_label(req.model)
        self.started = time.perf_counter()
        self.ttft: float | None = None
        self.prompt_tokens = sum(len(i) for i in prompt_ids)
        self.completion_tokens = 0
        self.status = "200"

    def _outputs(self, p: int, stream: bool) -> AsyncIterator[Any]:
        return self.service.engine.generate(self.prompt_ids[p], self.sampling, self.plan, f"{self.rid}-{p}",
                                            stream=stream)

    def _usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    async def final(self) -> dict:
        async def run(p: int):
            last = None
            async for out in self._outputs(p, stream=False):
                last = out
                self.ttft = self.ttft or time.perf_counter() - self.started
            return last
        try:
            outputs = await asyncio.gather(*(run(p) for p in range(len(self.prompt_ids))))
        except Exception:
            self.status = "500"
            raise
        finally:
            self._finish()
        choices = []
        for p, out in enumerate(outputs):
            for c in out.outputs:
                self.completion_tokens += len(c.token_ids)
                choices.append(_choice(self.chat, False, p * self.req.n + c.index, c.text, c.finish_reason or "stop",
                                       True))
        self._observe_tokens()
        return {"id": self.rid, "object": "chat.completion" if self.chat else "text_completion", "created": now(),
                "model": self.req.model, "choices": sorted(choices, key=lambda c: c["index"]), "usage": self._usage()}

    async def stream(self) -> AsyncIterator[bytes]:
        """SSE: one chunk per engine step and choice (the chat role comes with the first token), then usage
        (if asked) and [DONE]; an engine failure ends the stream with an error event."""
        created, obj = now(), "chat.completion.chunk" if self.chat else "text_completion"
        queue: asyncio.Queue = asyncio.Queue()

        def event(choices: list, usage: dict | None = None) -> bytes:
            body = {"id": self.rid, "object": obj, "created": created, "model": self.req.model, "choices": choices}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n".encode()

        async def pump(p: int) -> None:
            try:
                async for out in self._outputs(p, stream=True):
                    await queue.put((p, out))
            except Exception as err:  # noqa: BLE001 - reported in-band below
                await queue.put((p, err))
            finally:
                await queue.put((p, None))

        tasks = [asyncio.create_task(pump(p)) for p in range(len(self.prompt_ids))]
        started: set[int] = set()
        try:
            done = 0
            while done < len(tasks):
                p, item = await queue.get()
                if item is None:
                    done += 1
                    continue
                if isinstance(item, Exception):
                    self.status = "500"
                    yield _error_event(item, self.rid)
                    continue
                self.ttft = self.ttft or time.perf_counter() - self.started
                choices = []
                for c in item.outputs:
                    self.completion_tokens += len(c.token_ids)
                    index = p * self.req.n + c.index
                    choices.append(_choice(self.chat, True, index, c.text, c.finish_reason, index not in started))
                    started.add(index)
                yield event(choices)
            if self.req.include_usage:
                yield event([], self._usage())
            yield b"data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            self._finish()
            self._observe_tokens()

    def _finish(self) -> None:
        m = self.service.metrics
        m.requests.labels(self.model_label, self.label, self.status).inc()
        m.latency.labels(self.plan.path).observe(time.perf_counter() - self.started)
        m.ttft.labels(self.plan.path).observe(self.ttft or (time.perf_counter() - self.started))

    def _observe_tokens(self) -> None:
        m = self.service.metrics
        m.prompt_tokens.labels(self.plan.path).inc(self.prompt_tokens)
        m.generated_tokens.labels(self.plan.path).inc(self.completion_tokens)


def _error_event(err: Exception, rid: str) -> bytes:
    status = status_of(err)
    if status is None:
        log.error("stream %s failed", rid, exc_info=err)
    message, param = describe(err) if status else (f"internal server error (request id {rid})", None)
    return f"data: {json.dumps(error_body(message, status or 500, param))}\n\n".encode()
