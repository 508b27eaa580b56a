"""OpenAI-compatible endpoints: models, completions, chat completions, responses."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from deltaserve.server import responses as responses_api
from deltaserve.server import serving
from deltaserve.server.exceptions import NotFound
from deltaserve.server.listing import json_response, state_key
from deltaserve.server.protocol.admin import ModelCard, ModelList
from deltaserve.server.protocol.common import ErrorResponse, now
from deltaserve.server.protocol.responses import NOT_STORED, ResponsesRequest
from deltaserve.server.protocol.generation import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                                                   CompletionResponse)
from deltaserve.server.routes import INFERENCE, SERVICE
from deltaserve.server.service import AUTO, Service

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 503)}
router = APIRouter(dependencies=[INFERENCE], responses=ERRORS)


def _fixed_card(service: Service, name: str, created: int) -> ModelCard | None:
    """The card of the base, `auto`, an expert or a named recipe (None for anything else)."""
    limit, base = service.settings.engine.max_model_len, service.base_name
    if name == base:
        return ModelCard(id=base, created=created, root=base, max_model_len=limit, deltaserve={"kind": "base"})
    if name == AUTO:
        return ModelCard(id=AUTO, created=created, root=base, parent=base, max_model_len=limit,
                         deltaserve={"kind": "router", "router": getattr(service.routing, "name", None)})
    if name in service.visible_experts():
        return ModelCard(id=name, created=created, root=base, parent=base, max_model_len=limit,
                         deltaserve=service.expert_card(name).model_dump())
    if name in service.visible_named():
        return ModelCard(id=name, created=created, root=base, parent=base, max_model_len=limit,
                         deltaserve={"kind": "named_recipe", **service.recipe_card(name).model_dump()})
    return None


def _cards(service: Service) -> list[ModelCard]:
    created = now()
    names = dict.fromkeys([service.base_name, AUTO, *sorted(service.visible_experts()),
                           *sorted(service.visible_named())])
    return [card for n in names if (card := _fixed_card(service, n, created)) is not None]


@router.get("/v1/models", response_model=ModelList)
async def models(service: Service = SERVICE) -> Response:
    """The base, `auto`, every expert and every named recipe (built once per store state: server.listing)."""
    _, body = service.listings.cards(("models", service.view().key), state_key(service), lambda: _cards(service),
                                     lambda cards: ModelList(data=cards))
    return json_response(body)


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def model(model_id: str, service: Service = SERVICE) -> ModelCard:
    """One model: the base, `auto`, an expert, or any servable recipe expression."""
    created = now()
    card = _fixed_card(service, model_id, created)
    if card is not None:
        return card
    recipe, _ = await service.resolve(model_id, None, record=False)    # 404 / 400 for what is not servable
    plan = service.engine.plan(recipe)
    return ModelCard(id=model_id, created=created, root=service.base_name, parent=service.base_name,
                     max_model_len=service.settings.engine.max_model_len,
                     deltaserve={"kind": "recipe", "recipe": recipe.label(service.base_name), "path": plan.path,
                                 "reason": plan.reason or None,
                                 "weights": dict(recipe.terms), "method": recipe.method,
                                 "options": recipe.option_dict})


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def completions(req: CompletionRequest, service: Service = SERVICE) -> Response:
    return await serving.completions(service, req)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def chat_completions(req: ChatCompletionRequest, service: Service = SERVICE) -> Response:
    return await serving.chat_completions(service, req)


@router.post("/v1/responses", responses={200: {"content": {"text/event-stream": {}}}})
async def responses(req: ResponsesRequest, service: Service = SERVICE) -> Response:
    """The Responses API (server.responses): text and function calls over any recipe and `auto`."""
    return await responses_api.responses(service, req)


@router.get("/v1/responses/{response_id}")
async def retrieve_response(response_id: str) -> Response:
    raise NotFound(f"response {response_id!r} not found: {NOT_STORED}", "response_id")
