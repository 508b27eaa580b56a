"""``POST /v1/responses``: the Responses API over every recipe and `auto`, with vLLM's own pieces.

A request is vLLM's ``ResponsesRequest`` (server.protocol.responses). Its
``instructions`` and ``input`` items (messages, function calls, function call
outputs) become chat messages by vLLM's ``construct_input_messages``; the chat is
rendered, routed (`auto`: on the last user message) and served like a chat
completion, with ``to_sampling_params`` of vLLM's request. The output items are
built by vLLM's ``build_response_output_items`` from the tool-call parser's
reading of the text (server.tools), the response by vLLM's
``ResponsesResponse.from_request``, and a stream's events (``response.created``
… ``response.completed``) by vLLM's ``SimpleStreamingEventProcessor``. The
recipe served is in the response's ``metadata`` under ``deltaserve`` (a JSON
string: metadata values are strings) and in the ``x-deltaserve-recipe`` header.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from deltaserve.router.text import route_text
from deltaserve.server.call import Call
from deltaserve.server.errors import describe, status_of
from deltaserve.server.exceptions import InvalidRequest, from_vllm
from deltaserve.server.prompts import chat_prompt, generation_defaults, max_new_tokens, plain_messages
from deltaserve.server.protocol.common import now
from deltaserve.server.protocol.responses import ResponsesRequest
from deltaserve.server.service import Service
from deltaserve.server.serving import RECIPE_HEADER, reject_refused, served_as
from deltaserve.server.tools import ToolOutputs
from deltaserve.server.vllm_compat import VLLMValidationError

log = logging.getLogger("deltaserve")


async def responses(service: Service, req: ResponsesRequest) -> Response:
    from deltaserve.server.vllm_compat import responses_utils

    reject_refused(req)
    req, tools = service.tools.prepare(req)
    try:
        chat = responses_utils.construct_input_messages(request_instructions=req.instructions,
                                                        request_input=req.input)
    except VLLMValidationError as err:
        raise from_vllm(err, param="input") from None
    except (ValueError, TypeError, KeyError, AttributeError) as err:
        raise InvalidRequest(f"cannot read these input items: {err}", "input") from None
    messages = plain_messages(chat)
    model = req.model or service.base_name
    recipe, route = await service.resolve(model, route_text(messages=messages))
    limit = service.settings.engine.max_model_len
    template_tools = responses_utils.construct_tool_dicts(req.tools, req.tool_choice)
    prompt = await asyncio.to_thread(chat_prompt, service.engine.tokenizer, req, messages, limit, template_tools)
    defaults = generation_defaults(str(service.settings.engine.base_dir))
    params = req.sampling(max_new_tokens(None, len(prompt.ids), limit, defaults), defaults)
    plan = service.engine.plan(recipe, arriving=True)
    call = ResponsesCall(service, req, plan, [prompt], [params], tools, model)
    call.metadata = {**(req.metadata or {}), "deltaserve": json.dumps(served_as(call, recipe, route))}
    headers = {RECIPE_HEADER: call.label}
    if req.stream:
        await call.open_stream()
        return StreamingResponse(call.events(), media_type="text/event-stream", headers=headers)
    body = await call.response()
    return JSONResponse(body, headers=headers)


class ResponsesCall(Call):
    """One Responses request's run: the engine part is a chat completion's (server.call)."""

    def __init__(self, service: Service, req: ResponsesRequest, plan: Any, prompts: list, params: list,
                 tools: ToolOutputs | None, model: str) -> None:
        req.n, req.model = 1, model   # one output, as in the Responses API (Call reads ``n`` and ``model``)
        super().__init__(service, req, plan, prompts, params, chat=True, echo_prefix="", tools=tools)
        self.rid = f"resp_{req.request_id}"
        self.model = model
        self.metadata: dict[str, str] = {}
        self.created = now()
        self.cached = 0   # prompt tokens found in vLLM's prefix cache

    def _output_items(self, out: Any) -> list:
        """The response's output items from the whole output (text, function calls)."""
        from deltaserve.server.vllm_compat import responses_utils

        text, calls = out.text, list[Any]()
        if self.tools is not None:
            _, text, calls = self.tools.parse(out.text, out.token_ids)
        return responses_utils.build_response_output_items(reasoning=None, content=text, tool_calls=calls,
                                                           tools=self.req.tools)

    def _response(self, output: list, status: str, usage: bool) -> Any:
        from deltaserve.server.vllm_compat import ResponsesResponse, ResponseUsage

        use = ResponseUsage(input_tokens=self.prompt_tokens, output_tokens=self.completion_tokens,
                            total_tokens=self.prompt_tokens + self.completion_tokens,
                            input_tokens_details={"cached_tokens": self.cached, "cache_write_tokens": 0},
                            output_tokens_details={}) if usage else None
        response = ResponsesResponse.from_request(self.req, self.params[0], model_name=self.model,
                                                  created_time=self.created, output=output, status=status,
                                                  usage=use)
        response.id, response.metadata = self.rid, self.metadata
        return response

    async def response(self) -> dict:
        last: Any = None
        try:
            async for out in self._outputs(0, stream=False):
                last = out
                self.cached = getattr(out, "num_cached_tokens", None) or self.cached
                self.ttft = self.ttft or time.perf_counter() - self.started
        except Exception as err:
            self._failed(err)
            raise
        finally:
            self._finish()
        output = last.outputs[0]
        self.completion_tokens = len(output.token_ids)
        self._observe_tokens()
        status = "incomplete" if output.finish_reason == "length" else "completed"
        return self._response(self._output_items(output), status, usage=True).model_dump(mode="json", by_alias=True)

    async def events(self) -> AsyncIterator[bytes]:
        """SSE: vLLM's event sequence for a simple (non-Harmony) response."""
        from openai.types.responses import ResponseCompletedEvent, ResponseCreatedEvent, ResponseInProgressEvent

        from deltaserve.server.vllm_compat import responses_streaming as ev

        seq = iter(range(1 << 30))
        processor = ev.SimpleStreamingEventProcessor(tools=self.req.tools)
        initial = self._response([], "in_progress", usage=False).model_dump(mode="json", by_alias=True)
        yield _event(ResponseCreatedEvent(type="response.created", sequence_number=next(seq), response=initial))
        yield _event(ResponseInProgressEvent(type="response.in_progress", sequence_number=next(seq),
                                                response=initial))
        finish = None
        try:
            item = self._first
            while item is not None:
                _, out = item
                if isinstance(out, Exception):
                    raise out
                self.ttft = self.ttft or time.perf_counter() - self.started
                c = out.outputs[0]
                self.cached = getattr(out, "num_cached_tokens", None) or self.cached
                self.completion_tokens += len(c.token_ids)
                finish = c.finish_reason or finish
                for event in self._piece_events(processor, ev, c):
                    yield _event(event.model_copy(update={"sequence_number": next(seq)}))
                item = await anext(self._stream, None)
            for event in processor.close_current():
                yield _event(event.model_copy(update={"sequence_number": next(seq)}))
            status = "incomplete" if finish == "length" else "completed"
            final = self._response(processor.output_items, status, usage=True).model_dump(mode="json", by_alias=True)
            yield _event(ResponseCompletedEvent(type="response.completed", sequence_number=next(seq), response=final))
        except Exception as err:  # noqa: BLE001 - after the 200, a failure ends the stream with an error event
            self._failed(err)
            yield _error_event(err, self.rid, next(seq))
        finally:
            await self._stream.aclose()
            self._finish()
            self._observe_tokens()

    def _piece_events(self, processor: Any, ev: Any, c: Any) -> list:
        from deltaserve.server.vllm_compat import DeltaMessage

        if self.tools is not None:
            delta = self.tools.delta_message(0, c.text, c.token_ids, self.prompts[0].ids, c.finish_reason)
        else:
            delta = DeltaMessage(content=c.text) if c.text else None
        events: list = []
        for dm in ev.split_delta(delta) if delta else []:
            target, call = processor.resolve_target_state(dm)
            if target == ev._StateType.NONE:
                continue
            if processor.needs_transition(target, call):
                events += [*processor.close_current(), *processor.open(target, call)]
            events += processor.emit_delta(dm, c, lambda _: [])
        return events


def _event(event: Any) -> bytes:
    return f"event: {event.type}\ndata: {event.model_dump_json(by_alias=True)}\n\n".encode()


def _error_event(err: Exception, rid: str, seq: int) -> bytes:
    """The Responses API's ``error`` event: the client's error, or an internal one without internals."""
    status = getattr(err, "status", None) or status_of(err)
    if status is None:
        log.error("response stream %s failed", rid, exc_info=err)
    message, param = describe(err) if status else (f"internal server error (request id {rid})", None)
    body = {"type": "error", "code": str(status or 500), "message": message, "param": param, "sequence_number": seq}
    return f"event: error\ndata: {json.dumps(body)}\n\n".encode()
