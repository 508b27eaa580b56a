"""Expert admin: list, inspect, register, delete; named recipes; and the routing dry run."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import Response

from deltaserve.router.text import route_text
from deltaserve.server.exceptions import ExpertUnavailable, InvalidRequest
from deltaserve.server.listing import json_response, page, state_key
from deltaserve.server.protocol.admin import (DeletedExpert, DeletedRecipe, ExpertCard, ExpertList, ExpertRegistration,
                                              RecipeCard, RecipeList, RecipeRegistration, RouteRequest, RouteResponse)
from deltaserve.server.protocol.common import ErrorResponse
from deltaserve.server.routes import ADMIN, INFERENCE, SERVICE
from deltaserve.server.service import Service

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 409, 503)}
router = APIRouter(responses=ERRORS)


@router.get("/v1/experts", response_model=ExpertList, dependencies=[INFERENCE])
async def list_experts(service: Service = SERVICE, limit: int | None = Query(None, ge=1, le=100_000),
                       after: str | None = Query(None, description="an expert id: list the experts after it")
                       ) -> Response:
    """Every expert in id order, or a page of ``limit`` after ``after`` (``has_more``, ``last_id``)."""
    await service.sync()   # another replica may have changed the store
    engine, view = service.engine, service.view()
    unavailable = {n: why for n, why in engine.unavailable.items() if view.sees(n)}

    def wrap(cards: list[ExpertCard], more: bool = False) -> ExpertList:
        return ExpertList(data=cards, store_generation=engine.generation, unavailable=unavailable,
                          first_id=cards[0].id if cards else None, last_id=cards[-1].id if cards else None,
                          has_more=more)
    cards, whole = service.listings.cards(("experts", view.key), state_key(service),
                                          lambda: [service.expert_card(n) for n in sorted(service.visible_experts())],
                                          wrap)
    if limit is None and after is None:
        return json_response(whole)
    return json_response(wrap(*page(cards, limit, after)).model_dump_json().encode())


@router.get("/v1/experts/{name}", response_model=ExpertCard, dependencies=[INFERENCE])
async def get_expert(name: str, service: Service = SERVICE) -> ExpertCard:
    await service.sync()
    if name in service.engine.unavailable and service.view().sees(name):
        raise ExpertUnavailable(f"expert {name!r} is in the store but cannot be served: "
                            f"{service.engine.unavailable[name]}")
    return service.expert_card(name)


@router.post("/v1/experts", response_model=ExpertCard, status_code=201, dependencies=[ADMIN])
async def register(body: ExpertRegistration, service: Service = SERVICE) -> ExpertCard:
    return await service.register(body)


@router.delete("/v1/experts/{name}", response_model=DeletedExpert, dependencies=[ADMIN])
async def delete(name: str, service: Service = SERVICE) -> DeletedExpert:
    await service.delete(name)
    return DeletedExpert(id=name)


@router.get("/v1/recipes", response_model=RecipeList, dependencies=[INFERENCE])
async def list_recipes(service: Service = SERVICE) -> RecipeList:
    await service.sync()
    return RecipeList(data=[service.recipe_card(n) for n in sorted(service.visible_named())])


@router.get("/v1/recipes/{name}", response_model=RecipeCard, dependencies=[INFERENCE])
async def get_recipe(name: str, service: Service = SERVICE) -> RecipeCard:
    await service.sync()
    return service.recipe_card(name)


@router.post("/v1/recipes", response_model=RecipeCard, status_code=201, dependencies=[ADMIN])
async def name_recipe(body: RecipeRegistration, service: Service = SERVICE) -> RecipeCard:
    """Name a recipe: clients then send the name as `model`; `/v1/models` lists it and `/metrics` reports it
    resident under that name too (a gateway routes on it)."""
    return await service.name_recipe(body)


@router.delete("/v1/recipes/{name}", response_model=DeletedRecipe, dependencies=[ADMIN])
async def delete_recipe(name: str, service: Service = SERVICE) -> DeletedRecipe:
    await service.delete_recipe(name)
    return DeletedRecipe(id=name)


@router.post("/v1/route", response_model=RouteResponse, dependencies=[INFERENCE])
async def route(req: RouteRequest, service: Service = SERVICE) -> RouteResponse:
    if req.messages:
        text = route_text(messages=[{"role": m.role, "content": m.text()} for m in req.messages])
    elif req.prompt is not None:
        text = route_text(prompt=req.prompt, markup=service.markup)
    else:
        raise InvalidRequest("give `messages` or `prompt` to route", "messages")
    recipe, decision = await service.resolve(req.model, text, record=False)
    plan = service.engine.plan(recipe)
    return RouteResponse(model=req.model, recipe=recipe.label(service.base_name), path=plan.path,
                         weights=dict(recipe.terms), route=decision)
