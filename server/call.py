"""One request's run through the engine: its id, timing, token counts, choices, response body or SSE stream,
and its metrics (server.serving builds it; the shapes of choices and logprobs are server.choices')."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from deltaserve.server import choices as shape
from deltaserve.server.engine.types import Plan
from deltaserve.server.errors import describe, error_body, status_of
from deltaserve.server.prompts import Prompt
from deltaserve.server.protocol.common import now
from deltaserve.server.service import Service
from deltaserve.server.tools import ToolOutputs

log = logging.getLogger("deltaserve")


def system_fingerprint(base_fingerprint: str, plan: Plan) -> str:
    """Changes whenever the weights a response was computed with do: base, recipe, expert versions."""
    key = "|".join([base_fingerprint, plan.path, plan.recipe.key, *(i.token for i in plan.experts)])
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:12]


class Call:
    """One request's run through the engine: its id, timing, token counts, choices and metrics."""

    def __init__(self, service: Service, req, plan: Plan, prompts: list[Prompt], params: list[Any], chat: bool,
                 echo_prefix: str, tools: ToolOutputs | None = None) -> None:
        self.service, self.req, self.plan, self.prompts, self.params = service, req, plan, prompts, params
        self.chat, self.echo_prefix, self.tools = chat, echo_prefix, tools
        self.rid = f"{'chatcmpl' if chat else 'cmpl'}-{req.request_id}"
        self.label = plan.recipe.label(service.base_name)
        self.model_label = service.model_label(req.model)
        self.fingerprint = system_fingerprint(service.store.fingerprint, plan)
        self.tokenizer = service.engine.tokenizer
        self.started = time.perf_counter()
        self.ttft: float | None = None
        self.prompt_tokens = sum(len(p.ids) for p in prompts)
        self.completion_tokens = 0
        self.status = "200"
        self.begun: set[int] = set()      # choices that have sent their first piece (role, echo, prompt ids)
        self.offsets: dict[int, int] = {}  # completion logprobs: text offset per choice

    def _outputs(self, p: int, stream: bool) -> AsyncIterator[Any]:
        return self.service.engine.generate(self.prompts[p].ids, self.params[p], self.plan,
                                            f"{self.rid}-{p}-{time.monotonic_ns()}", stream=stream)

    def _usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    # ------------------------------------------------------------------ choices
    def _choice(self, p: int, out: Any, c: Any, *, stream: bool, finish: str | None) -> dict | None:
        """One choice's piece (None: a streamed piece with nothing to send yet, e.g. inside a tool call)."""
        req = self.req
        index = p * req.n + c.index
        first = index not in self.begun
        extra: dict[str, Any] = {}
        if req.return_token_ids:
            extra["token_ids"] = list(c.token_ids)
            if not self.chat and (first or not stream):
                extra["prompt_token_ids"] = self.prompts[p].ids
        if self.chat:
            return self._chat_choice(p, index, c, first, stream, finish, extra)
        self.begun.add(index)
        as_ids, explicit = bool(req.return_tokens_as_token_ids), bool(req.logprob_token_ids)
        ids, steps, text = self._completion_piece(p, out, c, first)
        lp = None
        if req.logprobs is not None:
            lp = shape.completion_logprobs(ids, steps, req.logprobs, self.tokenizer, offset=self.offsets.get(index, 0),
                                           as_ids=as_ids, explicit=explicit)
            if lp["tokens"]:
                self.offsets[index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
        if not stream and self.params[p].prompt_logprobs is not None:
            extra["prompt_logprobs"] = shape.prompt_logprobs_json(out.prompt_logprobs)
        return shape.completion_choice(index, text, finish, c.stop_reason, lp, **extra)

    def _chat_choice(self, p: int, index: int, c: Any, first: bool, stream: bool, finish: str | None,
                     extra: dict) -> dict | None:
        req = self.req
        lp = shape.chat_logprobs(c.token_ids, c.logprobs or [], req.top_logprobs, self.tokenizer,
                                 as_ids=bool(req.return_tokens_as_token_ids),
                                 explicit=bool(req.logprob_token_ids)) if req.logprobs else None
        text: str | dict = (self.echo_prefix + c.text) if first and self.echo_prefix else c.text
        if self.tools is not None and stream:
            delta = self.tools.delta(index, c.text, c.token_ids, self.prompts[p].ids, finish)
            if delta is None and finish is None and lp is None and not req.return_token_ids:
                return None
            text, finish = delta or {}, self.tools.stream_finish(index, finish)
        elif self.tools is not None:
            text, finish = self.tools.message(c.text, c.token_ids, finish)
        self.begun.add(index)
        if stream:
            return shape.chat_delta_choice(index, text, first, finish, c.stop_reason, lp, **extra)
        return shape.chat_choice(index, text, finish, c.stop_reason, lp, **extra)

    def _completion_piece(self, p: int, out: Any, c: Any, first: bool) -> tuple[list[int], list, str]:
        """(token ids, their logprobs, text) a completion choice reports now: with ``echo``, the prompt first."""
        if not (self.req.echo and first):
            return list(c.token_ids), list(c.logprobs or []), c.text
        prompt, prompt_lp = self.prompts[p], list(out.prompt_logprobs or [None] * len(self.prompts[p].ids))
        if self.req.max_tokens == 0:
            return prompt.ids, prompt_lp, prompt.text
        return [*prompt.ids, *c.token_ids], [*prompt_lp, *(c.logprobs or [])], prompt.text + c.text

    def _body(self, obj: str, created: int, choices: list, usage: dict | None) -> dict:
        body = {"id": self.rid, "object": obj, "created": created, "model": self.req.model, "choices": choices,
                "system_fingerprint": self.fingerprint}
        if usage is not None:
            body["usage"] = usage
        return body

    def _chat_prompt_fields(self, body: dict, out: Any) -> None:
        if self.req.return_token_ids:
            body["prompt_token_ids"] = self.prompts[0].ids
        if self.req.return_prompt_text:
            body["prompt_text"] = self.prompts[0].text
        if self.params[0].prompt_logprobs is not None and out is not None:
            body["prompt_logprobs"] = shape.prompt_logprobs_json(out.prompt_logprobs)

    # ------------------------------------------------------------------ responses
    async def final(self) -> dict:
        async def run(p: int):
            last = None
            async for out in self._outputs(p, stream=False):
                last = out
                self.ttft = self.ttft or time.perf_counter() - self.started
            return last
        try:
            outputs = await asyncio.gather(*(run(p) for p in range(len(self.prompts))))
        except Exception as err:
            self._failed(err)
            raise
        finally:
            self._finish()
        choices = []
        for p, out in enumerate(outputs):
            for c in out.outputs:
                self.completion_tokens += len(c.token_ids)
                choices.append(self._choice(p, out, c, stream=False, finish=c.finish_reason or "stop"))
        self._observe_tokens()
        body = self._body("chat.completion" if self.chat else "text_completion", now(),
                          sorted(choices, key=lambda c: c["index"]), self._usage())
        if self.chat:
            self._chat_prompt_fields(body, outputs[0])
        return body

    async def _items(self) -> AsyncGenerator[tuple[int, Any], None]:
        """(prompt index, engine output — or the exception that ended that prompt) in arrival order; one prompt
        is read straight from the engine, several through a queue."""
        if len(self.prompts) == 1:
            try:
                async for out in self._outputs(0, stream=True):
                    yield 0, out
            except Exception as err:  # noqa: BLE001 - reported in-band (or as the HTTP status, if first)
                yield 0, err
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(p: int) -> None:
            try:
                async for out in self._outputs(p, stream=True):
                    await queue.put((p, out))
            except Exception as err:  # noqa: BLE001 - reported in-band
                await queue.put((p, err))
            finally:
                await queue.put((p, None))

        tasks = [asyncio.create_task(pump(p)) for p in range(len(self.prompts))]
        try:
            done = 0
            while done < len(tasks):
                p, item = await queue.get()
                if item is None:
                    done += 1
                else:
                    yield p, item
        finally:
            for t in tasks:
                t.cancel()

    async def open_stream(self) -> None:
        """Start the engine and wait for its first output, so a request the engine refuses (vLLM's own checks)
        is an HTTP error, not an error event after a 200."""
        self._stream = self._items()
        try:
            self._first = await anext(self._stream, None)
            if self._first is not None and isinstance(self._first[1], Exception):
                self._failed(self._first[1])
                raise self._first[1]
        except BaseException:   # refused, failed, or the client left while waiting: nothing is streamed
            await self._stream.aclose()
            self._finish()
            raise

    async def stream(self) -> AsyncIterator[bytes]:
        """SSE: one chunk per engine step and prompt (the chat role comes with the first token), then usage
        (if asked) and [DONE]; a later engine failure ends the stream with an error event."""
        created, obj = now(), "chat.completion.chunk" if self.chat else "text_completion"
        try:
            sent_prompt, item = False, self._first
            while item is not None:
                p, out = item
                if isinstance(out, Exception):
                    self._failed(out)
                    yield _error_event(out, self.rid)
                else:
                    self.ttft = self.ttft or time.perf_counter() - self.started
                    choices = []
                    for c in out.outputs:
                        self.completion_tokens += len(c.token_ids)
                        if (choice := self._choice(p, out, c, stream=True, finish=c.finish_reason)) is not None:
                            choices.append(choice)
                    if not choices and not self.req.continuous_usage:
                        item = await anext(self._stream, None)
                        continue
                    body = self._body(obj, created, choices, self._usage() if self.req.continuous_usage else None)
                    if self.chat and not sent_prompt:
                        self._chat_prompt_fields(body, None)
                        sent_prompt = True
                    yield _event(body)
                item = await anext(self._stream, None)
            if self.req.include_usage:
                yield _event(self._body(obj, created, [], self._usage()))
            yield b"data: [DONE]\n\n"
        finally:
            await self._stream.aclose()
            self._finish()
            self._observe_tokens()

    def _failed(self, err: BaseException) -> None:
        self.status = str(getattr(err, "status", None) or status_of(err) or 500)

    def _finish(self) -> None:
        m = self.service.metrics
        m.count_request(self.model_label, self.label, self.status)
        m.latency.labels(self.plan.path).observe(time.perf_counter() - self.started)
        m.ttft.labels(self.plan.path).observe(self.ttft or (time.perf_counter() - self.started))

    def _observe_tokens(self) -> None:
        m = self.service.metrics
        m.prompt_tokens.labels(self.plan.path).inc(self.prompt_tokens)
        m.generated_tokens.labels(self.plan.path).inc(self.completion_tokens)
        self.service.charge(self.prompt_tokens + self.completion_tokens)   # the key's tokens-per-minute limit


def _event(body: dict) -> bytes:
    return f"data: {json.dumps(body)}\n\n".encode()


def _error_event(err: Exception, rid: str) -> bytes:
    status = getattr(err, "status", None) or status_of(err)
    if status is None:
        log.error("stream %s failed", rid, exc_info=err)
    message, param = describe(err) if status else (f"internal server error (request id {rid})", None)
    return f"data: {json.dumps(error_body(message, status or 500, param))}\n\n".encode()
