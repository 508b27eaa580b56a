"""The HTTP API: OpenAI-compatible inference plus expert management, on FastAPI.

Inference: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``
(``stream: true`` is SSE). ``model`` is the base, an expert, ``auto`` or a merge
expression (server.recipes). Every response names the recipe it was served
with: header ``x-deltaserve-recipe`` and, when not streaming, a ``deltaserve``
field. Experts: ``GET/POST /v1/experts``, ``GET/DELETE /v1/experts/{name}``.
Routing dry run: ``POST /v1/route``. Operations: ``GET /health``, ``GET /metrics``.

Auth: with ``api_keys`` set, inference and reads need ``Authorization: Bearer
<key>``; with ``admin_keys`` set, expert writes need an admin key (admin keys
also work for inference). With no keys configured the API is open (the demo).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from experts.expert import ExpertFormatError
from experts.store import Compression, ExpertStore, StoreError, UnknownExpertError
from server.engine import Engine, EngineConfig, Plan
from server.metrics import CONTENT_TYPE, Metrics
from server.protocol import (ChatCompletionRequest, CompletionRequest, ExpertRegistration, RouteRequest,
                             completion_id, error_body, now)
from server.recipes import Recipe, RecipeError, parse_model
from router.text import route_text

log = logging.getLogger("deltaserve")
RECIPE_HEADER = "x-deltaserve-recipe"
AUTO = "auto"


class RouterSettings(BaseModel):
    """How `model: auto` is routed (router package); thresholds default to the zoo-calibrated ones."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("none", pattern="^(none|knn|gate|uncertainty)$")
    top_k: int = Field(1, ge=1, le=8)
    grid: float = Field(0.25, gt=0.0, le=1.0)
    min_confidence: float | None = Field(None, ge=0.0, le=1.0)
    max_distance: float | None = Field(None, ge=0.0)
    fallback: str = Field("", description="recipe served on fallback ('' = the base)")


class ServerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    store_dir: Path
    engine: EngineConfig
    api_keys: list[str] = Field(default_factory=list)
    admin_keys: list[str] = Field(default_factory=list)
    register_roots: list[Path] = Field(default_factory=list, description="registration paths must lie under one")
    auto_recipe: str = Field("", description="what `auto` serves without a router ('' = the base)")
    store_poll_s: float = Field(2.0, gt=0.0)
    router: RouterSettings = Field(default_factory=RouterSettings)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


class Service:
    """What the request handlers share: settings, store, engine, metrics, router."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.store = ExpertStore(settings.store_dir, settings.engine.base_dir)
        self.engine = Engine(settings.engine, self.store, self.metrics)
        self.routing: Any = None        # router.RoutingService when a router is configured
        self.base_name = settings.engine.served_name

    # ------------------------------------------------------------------ recipes
    async def resolve(self, model: str, text: str | None = None, *, record: bool = True
                      ) -> tuple[Recipe, dict | None]:
        """A request's `model` -> (recipe, routing decision as JSON or None)."""
        experts = frozenset(self.engine.experts)
        if model == AUTO:
            if self.routing is not None and text is not None:
                decision = (await asyncio.to_thread(self.routing.route, [text]))[0]
                if record:   # a dry run (/v1/route) is not a routing decision
                    self._record_route(decision)
                recipe = Recipe.of(dict(decision.recipe))
                if any(n not in experts for n in recipe.names):
                    raise APIError(503, f"the router chose {recipe.key!r}, which is no longer servable")
                return recipe, decision.to_json()
            return self._auto_default(experts), {"router": None, "fallback": "no_router"}
        try:
            return parse_model(model, base_name=self.base_name, experts=experts), None
        except RecipeError as err:
            status = 404 if _looks_like_name(model) else 400
            raise APIError(status, str(err), "model") from None

    def _auto_default(self, experts: frozenset[str]) -> Recipe:
        text = self.settings.auto_recipe
        if not text:
            return Recipe()
        try:
            return parse_model(text, base_name=self.base_name, experts=experts)
        except RecipeError as err:
            raise APIError(503, f"the configured auto recipe is not servable: {err}") from None

    def _record_route(self, decision: Any) -> None:
        m = self.metrics
        m.router_latency.labels(decision.router).observe(decision.latency_s)
        m.route_confidence.labels(decision.router).observe(decision.confidence)
        if decision.fallback:
            m.route_fallbacks.labels(decision.router, decision.fallback).inc()
            m.route_decisions.labels(decision.router, "fallback").inc()
        for name in decision.recipe:
            m.route_decisions.labels(decision.router, name).inc()

    def model_label(self, model: str) -> str:
        return model if model in (AUTO, self.base_name) or model in self.engine.experts else "expression"

    # ------------------------------------------------------------------ experts
    def expert_json(self, name: str) -> dict:
        info = self.engine.experts.get(name)
        if info is None:
            raise APIError(404, f"unknown expert {name!r}; known experts: {sorted(self.engine.experts)}")
        m = info.manifest
        return {
            "id": name, "object": "expert", "kind": m.kind, "codec": m.codec, "density": m.density, "rank": m.rank,
            "bytes": m.bytes, "bits_per_param": m.bits_per_param, "base_params": m.base_params,
            "base_fingerprint": m.base_fingerprint, "source": m.source, "method": m.method, "task": m.task,
            "calibration_score": m.calibration_score, "created": m.created,
            "path": self.engine.plan(Recipe(((name, 1.0),))).path,
            "exemplars": len(self.store.exemplars(name)),
        }

    def check_register_path(self, raw: str) -> Path:
        roots = [Path(os.path.realpath(r)) for r in self.settings.register_roots]
        if not roots:
            raise APIError(403, "registration from server paths is disabled: start the server with --register-root DIR")
        path = Path(os.path.realpath(raw))
        if not any(path == r or r in path.parents for r in roots):
            raise APIError(403, f"path {raw!r} is outside the allowed registration roots {[str(r) for r in roots]}",
                           "path")
        if not path.is_dir():
            raise APIError(400, f"path {raw!r} is not a directory on the server", "path")
        return path

    async def refresh_routing(self) -> None:
        if self.routing is None:
            return
        exemplars = {n: self.store.exemplars(n) for n in self.engine.experts}
        if getattr(self.routing.router, "needs_exemplars", True):
            exemplars = {n: t for n, t in exemplars.items() if t}
        await asyncio.to_thread(self.routing.set_exemplars, exemplars)

    def build_routing(self, loop: asyncio.AbstractEventLoop) -> Any:
        """The configured router, or None; the uncertainty router scores through this engine."""
        rs = self.settings.router
        if rs.name == "none":
            return None
        import torch

        from router import Policy, RoutingService, make_router
        from router.base import DEFAULT_MAX_DISTANCE, DEFAULT_MIN_CONFIDENCE

        # The engine runs in its own processes; here torch only encodes one prompt at a time, and
        # OpenMP threads competing with the engine made that 100x slower (0.5 s vs 5 ms, measured).
        torch.set_num_threads(1)

        fallback = dict(parse_model(rs.fallback, base_name=self.base_name,
                                    experts=frozenset(self.engine.experts)).terms) if rs.fallback else {}
        if rs.name == "uncertainty":
            router = make_router("uncertainty", uncertainty_scorer=self._engine_scorer(loop))
            max_distance = None
        else:
            from router import SentenceEncoder
            # bf16 MiniLM: cosine >= 0.999 to fp32 (same routing), ~40 % faster (results/routing/README.md)
            router = make_router(rs.name, encoder=SentenceEncoder(precision="bf16"))
            max_distance = rs.max_distance if rs.max_distance is not None else DEFAULT_MAX_DISTANCE
        policy = Policy(top_k=rs.top_k, grid=rs.grid, max_distance=max_distance, fallback=fallback,
                        min_confidence=rs.min_confidence if rs.min_confidence is not None else DEFAULT_MIN_CONFIDENCE)
        m = self.metrics   # series exist from the start, so Prometheus' rate() sees their first increment
        m.route_decisions.labels(rs.name, "fallback")
        m.router_latency.labels(rs.name)
        m.route_confidence.labels(rs.name)
        for reason in ("low_confidence", "out_of_distribution", "no_experts"):
            m.route_fallbacks.labels(rs.name, reason)
        return RoutingService(router, policy)

    def _engine_scorer(self, loop: asyncio.AbstractEventLoop):
        """(texts, experts) -> NLL matrix via vLLM prompt_logprobs; called from a worker thread."""
        import numpy as np

        def scorer(texts, experts):
            tok = self.engine.tokenizer
            prompts = [_chat_ids(tok, [{"role": "user", "content": t}]) for t in texts]
            future = asyncio.run_coroutine_threadsafe(self.engine.nll(prompts, list(experts)), loop)
            return np.asarray(future.result(timeout=300))
        return scorer


def _looks_like_name(model: str) -> bool:
    return bool(model) and all(c.isalnum() or c in "_.-" for c in model)


# ---------------------------------------------------------------------------- app


def create_app(settings: ServerSettings, *, routing: Any = None, on_ready: Any = None) -> FastAPI:
    service = Service(settings)
    service.routing = routing

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.engine.start()
        if service.routing is None:
            service.routing = await asyncio.to_thread(service.build_routing, asyncio.get_running_loop())
        await service.refresh_routing()
        poller = asyncio.create_task(_poll_store(service))
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            poller.cancel()
            await service.engine.shutdown()

    app = FastAPI(title="deltaserve", version="0.1.0", lifespan=lifespan)
    app.state.service = service

    def _count_failure(request: Request, status: int) -> None:
        if request.url.path in ("/v1/completions", "/v1/chat/completions"):
            service.metrics.requests.labels("other", "none", str(status)).inc()

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        _count_failure(request, err.status)
        return JSONResponse(error_body(err.message, err.status, err.param), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        problems = []
        for e in err.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {e.get('msg')}")
        message = "invalid request: " + "; ".join(problems[:5])
        _count_failure(request, 400)
        return JSONResponse(error_body(message, 400), status_code=400)

    @app.exception_handler(Exception)
    async def _crash(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        status = 503 if not service.engine.alive else 500
        _count_failure(request, status)
        return JSONResponse(error_body(f"{type(err).__name__}: {err}", status), status_code=status)

    def _keys(admin: bool):
        async def check(request: Request) -> None:
            allowed = settings.admin_keys if admin else settings.api_keys + settings.admin_keys
            required = settings.admin_keys if admin else settings.api_keys
            if not required:
                return
            header = request.headers.get("authorization", "")
            token = header[7:].strip() if header.lower().startswith("bearer ") else ""
            if not token:
                raise APIError(401, "missing bearer token: send 'Authorization: Bearer <key>'")
            if token not in allowed:
                raise APIError(403 if admin and token in settings.api_keys else 401,
                               "this key may not manage experts" if admin and token in settings.api_keys
                               else "invalid API key")
        return Depends(check)

    inference, admin = _keys(False), _keys(True)

    @app.get("/health")
    async def health() -> Response:
        try:
            await service.engine.check_health()
        except Exception as err:  # noqa: BLE001 - any engine failure is "unhealthy"
            return JSONResponse({"status": "unhealthy", "detail": str(err)}, status_code=503)
        return JSONResponse({"status": "ok", "experts": len(service.engine.experts),
                             "store_generation": service.engine.generation})

    @app.get("/metrics")
    async def metrics() -> Response:
        service.metrics.engine_up.set(1 if service.engine.alive else 0)
        return Response(service.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=[inference])
    async def models() -> dict:
        created = now()
        rows = [{"id": service.base_name, "object": "model", "created": created, "owned_by": "deltaserve",
                 "deltaserve": {"kind": "base"}},
                {"id": AUTO, "object": "model", "created": created, "owned_by": "deltaserve",
                 "deltaserve": {"kind": "router", "router": getattr(service.routing, "name", None)}}]
        for name in sorted(service.engine.experts):
            rows.append({"id": name, "object": "model", "created": created, "owned_by": "deltaserve",
                         "root": service.base_name, "parent": service.base_name,
                         "deltaserve": service.expert_json(name)})
        return {"object": "list", "data": rows}

    @app.post("/v1/completions", dependencies=[inference])
    async def completions(req: CompletionRequest) -> Response:
        _reject_unsupported(req)
        prompts = req.prompts
        recipe, route = await service.resolve(req.model, route_text(prompt=prompts[0]))
        tok = service.engine.tokenizer
        ids = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
        max_tokens = req.max_tokens or req.max_completion_tokens or 16
        return await _serve(service, req, recipe, route, ids, max_tokens, chat=False)

    @app.post("/v1/chat/completions", dependencies=[inference])
    async def chat(req: ChatCompletionRequest) -> Response:
        _reject_unsupported(req)
        messages = req.plain_messages()
        recipe, route = await service.resolve(req.model, route_text(messages=messages))
        ids = _chat_ids(service.engine.tokenizer, messages)
        limit = service.settings.engine.max_model_len
        max_tokens = req.max_completion_tokens or req.max_tokens or max(1, limit - len(ids))
        return await _serve(service, req, recipe, route, [ids], max_tokens, chat=True)

    @app.post("/v1/route", dependencies=[inference])
    async def route(req: RouteRequest) -> dict:
        if req.messages:
            text = route_text(messages=[{"role": m.role, "content": m.text()} for m in req.messages])
        elif req.prompt is not None:
            text = route_text(prompt=req.prompt)
        else:
            raise APIError(400, "give `messages` or `prompt` to route")
        recipe, decision = await service.resolve(req.model, text, record=False)
        plan = service.engine.plan(recipe)
        return {"model": req.model, "recipe": recipe.label(service.base_name), "path": plan.path,
                "weights": dict(recipe.terms), "route": decision}

    @app.get("/v1/experts", dependencies=[inference])
    async def list_experts() -> dict:
        if await service.engine.refresh():   # changed by another replica: the router must follow too
            await service.refresh_routing()
        return {"object": "list", "data": [service.expert_json(n) for n in sorted(service.engine.experts)],
                "store_generation": service.engine.generation}

    @app.get("/v1/experts/{name}", dependencies=[inference])
    async def get_expert(name: str) -> dict:
        if await service.engine.refresh():   # changed by another replica: the router must follow too
            await service.refresh_routing()
        return service.expert_json(name)

    @app.post("/v1/experts", dependencies=[admin], status_code=201)
    async def register(body: ExpertRegistration) -> dict:
        if body.name in (service.base_name, AUTO):
            raise APIError(400, f"{body.name!r} is reserved", "name")
        path = service.check_register_path(body.path)
        try:
            compression = Compression.model_validate(body.compression) if body.compression is not None else None
        except ValidationError as err:
            raise APIError(400, f"invalid compression: {err.errors()[0]['loc']}: {err.errors()[0]['msg']}",
                           "compression") from None
        objective = None
        if compression is not None and compression.method == "nps":
            objective = await asyncio.to_thread(_nps_objective, settings.engine.base_dir, compression.task)
        try:
            await asyncio.to_thread(service.store.import_source, body.name, path, compression=compression,
                                    exemplars=body.exemplars, replace=body.replace, objective=objective)
        except UnknownExpertError as err:
            raise APIError(404, str(err)) from None
        except StoreError as err:
            status = 409 if "already exists" in str(err) else 400
            raise APIError(status, str(err)) from None
        except (ExpertFormatError, ValueError, OSError) as err:
            raise APIError(400, f"cannot register {body.path!r}: {err}", "path") from None
        await service.engine.refresh(force=True)
        await service.refresh_routing()
        return service.expert_json(body.name)

    @app.delete("/v1/experts/{name}", dependencies=[admin])
    async def delete(name: str) -> dict:
        try:
            await asyncio.to_thread(service.store.delete, name)
        except UnknownExpertError as err:
            raise APIError(404, str(err)) from None
        except StoreError as err:
            raise APIError(400, str(err)) from None
        await service.engine.refresh(force=True)
        await service.refresh_routing()
        return {"id": name, "object": "expert", "deleted": True}

    return app


def _nps_objective(base_dir: Path, task: str | None):
    from experts.zoo.build import load_llama, load_tokenizer
    from experts.zoo.evaluate import TaskEvaluator, task_vector_objective
    from experts.zoo.tasks import TASKS

    if not task or task not in TASKS:
        raise APIError(400, f"compression method 'nps' needs `task`, one of {sorted(TASKS)}", "compression")
    evaluator = TaskEvaluator(load_tokenizer(base_dir), [task], "calib", 64)
    return task_vector_objective(load_llama(base_dir), evaluator, task)


async def _poll_store(service: Service) -> None:
    """Notice experts published or deleted by other replicas (shared store)."""
    while True:
        await asyncio.sleep(service.settings.store_poll_s)
        try:
            if await service.engine.refresh():
                await service.refresh_routing()
        except Exception:  # noqa: BLE001 - keep polling; the next round may succeed
            log.exception("store poll failed")


def _reject_unsupported(req) -> None:
    if bad := req.unsupported():
        raise APIError(400, f"not supported by deltaserve: {bad}", bad[0])


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    if messages[-1]["role"] == "assistant":
        raise APIError(400, "the last message must not be from the assistant", "messages")
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as err:  # noqa: BLE001 - template errors are the client's input
        raise APIError(400, f"cannot render these messages with the model's chat template: {err}",
                       "messages") from None
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


# ---------------------------------------------------------------------------- serving


async def _serve(service: Service, req, recipe: Recipe, route: dict | None, prompt_ids: list[list[int]],
                 max_tokens: int, *, chat: bool) -> Response:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    limit = service.settings.engine.max_model_len
    for ids in prompt_ids:
        if len(ids) + max_tokens > limit:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                                f"context of {limit} tokens", "max_tokens")
    plan = service.engine.plan(recipe)
    label = recipe.label(service.base_name)
    info = {"recipe": label, "path": plan.path, "weights": dict(recipe.terms), "method": recipe.method,
            "route": route}
    headers = {RECIPE_HEADER: label}
    kind = RequestOutputKind.DELTA if req.stream else RequestOutputKind.FINAL_ONLY
    params = SamplingParams(**req.sampling(max_tokens), output_kind=kind)
    rid = completion_id("chatcmpl" if chat else "cmpl")
    model_label = service.model_label(req.model)
    started = time.perf_counter()
    if req.stream:
        gen = _stream(service, req, plan, prompt_ids, params, rid, chat, started, model_label)
        return StreamingResponse(gen, media_type="text/event-stream", headers=headers)
    status = "200"
    try:
        outputs = await asyncio.gather(*(_final(service.engine, ids, params, plan, f"{rid}-{i}", started)
                                         for i, ids in enumerate(prompt_ids)))
    except Exception:
        status = "500"
        raise
    finally:
        service.metrics.requests.labels(model_label, label, status).inc()
    choices, prompt_tokens, completion_tokens = [], 0, 0
    for p, (out, _ttft) in enumerate(outputs):
        prompt_tokens += len(out.prompt_token_ids or [])
        for c in out.outputs:
            completion_tokens += len(c.token_ids)
            index = p * req.n + c.index
            if chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": c.text},
                                "finish_reason": c.finish_reason or "stop", "logprobs": None})
            else:
                choices.append({"index": index, "text": c.text, "finish_reason": c.finish_reason or "stop",
                                "logprobs": None})
    _observe(service, plan, started, min(t for _, t in outputs), prompt_tokens, completion_tokens)
    body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now(),
            "model": req.model, "choices": sorted(choices, key=lambda c: c["index"]),
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
            "deltaserve": info}
    return JSONResponse(body, headers=headers)


async def _final(engine: Engine, ids, params, plan: Plan, request_id: str, started: float):
    last, ttft = None, None
    async for out in engine.generate(ids, params, plan, request_id):
        last = out
        if ttft is None:
            ttft = time.perf_counter() - started
    return last, ttft or (time.perf_counter() - started)


def _observe(service: Service, plan: Plan, started: float, ttft: float, prompt_tokens: int, completion_tokens: int):
    m = service.metrics
    m.latency.labels(plan.path).observe(time.perf_counter() - started)
    m.ttft.labels(plan.path).observe(ttft)
    m.prompt_tokens.labels(plan.path).inc(prompt_tokens)
    m.generated_tokens.labels(plan.path).inc(completion_tokens)


async def _stream(service: Service, req, plan: Plan, prompt_ids, params, rid: str, chat: bool, started: float,
                  model_label: str) -> AsyncIterator[bytes]:
    """SSE: one chunk per engine step and choice, then usage (if asked) and [DONE]."""
    created = now()
    obj = "chat.completion.chunk" if chat else "text_completion"
    label = plan.recipe.label(service.base_name)

    def event(choices: list, usage: dict | None = None) -> bytes:
        body = {"id": rid, "object": obj, "created": created, "model": req.model, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n".encode()

    queue: asyncio.Queue = asyncio.Queue()

    async def pump(p: int, ids: list[int]) -> None:
        try:
            async for out in service.engine.generate(ids, params, plan, f"{rid}-{p}"):
                await queue.put((p, out))
        except Exception as err:  # noqa: BLE001 - reported in-band below
            await queue.put((p, err))
        finally:
            await queue.put((p, None))

    tasks = [asyncio.create_task(pump(p, ids)) for p, ids in enumerate(prompt_ids)]
    status, ttft, done = "200", None, 0
    prompt_tokens = sum(len(i) for i in prompt_ids)
    completion_tokens = 0
    try:
        if chat:
            yield event([{"index": p * req.n + j, "delta": {"role": "assistant", "content": ""},
                          "finish_reason": None, "logprobs": None}
                         for p in range(len(prompt_ids)) for j in range(req.n)])
        while done < len(tasks):
            p, item = await queue.get()
            if item is None:
                done += 1
                continue
            if isinstance(item, Exception):
                status = "500"
                yield f"data: {json.dumps(error_body(f'{type(item).__name__}: {item}', 500))}\n\n".encode()
                continue
            if ttft is None:
                ttft = time.perf_counter() - started
            choices = []
            for c in item.outputs:
                completion_tokens += len(c.token_ids)
                index = p * req.n + c.index
                if chat:
                    choices.append({"index": index, "delta": {"content": c.text} if c.text else {},
                                    "finish_reason": c.finish_reason, "logprobs": None})
                else:
                    choices.append({"index": index, "text": c.text, "finish_reason": c.finish_reason,
                                    "logprobs": None})
            yield event(choices)
        if req.include_usage:
            yield event([], {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                             "total_tokens": prompt_tokens + completion_tokens})
        yield b"data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        service.metrics.requests.labels(model_label, label, status).inc()
        _observe(service, plan, started, ttft or (time.perf_counter() - started), prompt_tokens, completion_tokens)
