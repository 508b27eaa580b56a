"""OpenAI-compatible endpoints: models, completions, chat completions."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from server import serving
from server.protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                             ErrorResponse, ModelCard, ModelList, now)
from server.routes import INFERENCE, SERVICE
from server.service import AUTO, Service

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 503)}
router = APIRouter(dependencies=[INFERENCE], responses=ERRORS)


@router.get("/v1/models", response_model=ModelList)
async def models(service: Service = SERVICE) -> ModelList:
    created = now()
    rows = [ModelCard(id=service.base_name, created=created, deltaserve={"kind": "base"}),
            ModelCard(id=AUTO, created=created,
                      deltaserve={"kind": "router", "router": getattr(service.routing, "name", None)})]
    for name in sorted(service.engine.experts):
        rows.append(ModelCard(id=name, created=created, root=service.base_name, parent=service.base_name,
                              deltaserve=service.expert_card(name).model_dump()))
    return ModelList(data=rows)


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def completions(req: CompletionRequest, service: Service = SERVICE) -> Response:
    return await serving.completions(service, req)


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
async def chat_completions(req: ChatCompletionRequest, service: Service = SERVICE) -> Response:
    return await serving.chat_completions(service, req)
