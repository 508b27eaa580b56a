"""The HTTP app: OpenAI-compatible inference plus expert management, on FastAPI.

``create_app(settings, engine=..., routing=...)`` wires the pieces: the
:class:`server.service.Service` (store, engine, router, metrics), the error
table (server.errors), and the route modules (server.routes: OpenAI endpoints,
expert admin, ops). Pass a fake ``engine`` to test the HTTP layer in-process.

Auth: with ``api_keys`` set, inference and reads need ``Authorization: Bearer
<key>``; with ``admin_keys`` set, expert writes need an admin key (admin keys
also work for inference). With no keys configured the API is open (the demo). With ``key_file``
(server.tenants) keys are scoped to tenants, roles and limits instead (server.limits.Tenancy).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from deltaserve.server import errors
from deltaserve.server.auth import bearer_token
from deltaserve.server.engine.types import EngineProtocol
from deltaserve.server.limits import OPS_PATHS, Tenancy
from deltaserve.server.routes import experts, lora, openai, ops, tokenize
from deltaserve.server.service import Service
from deltaserve.server.settings import ServerSettings
from deltaserve.server.engine.supervisor import EngineSupervisor

INFERENCE_PATHS = ("/v1/completions", "/v1/chat/completions")


def create_app(settings: ServerSettings, *, engine: EngineProtocol | None = None, routing: Any = None,
               on_ready: Callable[[], None] | None = None) -> FastAPI:
    service = Service(settings, engine=engine, routing=routing)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        supervisor = EngineSupervisor(service.engine, service.metrics, on_restart=service.after_restart)
        tasks = [asyncio.create_task(service.poll_store()), asyncio.create_task(supervisor.run())]
        _reload_keys_on_sighup(service)
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await service.engine.shutdown()

    app = FastAPI(title="deltaserve", version="0.1.0", lifespan=lifespan)
    app.state.service = service

    def count_failure(request: Request, status: int) -> None:
        if request.url.path in INFERENCE_PATHS:
            service.metrics.requests.labels("other", "none", str(status)).inc()

    if service.keys is not None:   # scoped keys: the caller of each request, its limits (server.limits); added
        # first, it runs inside the request-id and body-limit middleware, just outside the routes
        app.add_middleware(Tenancy, ring=service.keys, limiter=service.limiter, metrics=service.metrics)
    errors.install(app, count_failure)
    app.add_middleware(errors.BodyLimit, max_bytes=settings.max_request_bytes)
    if settings.ops_need_key:
        app.add_middleware(OpsKey, keys=settings.api_keys + settings.admin_keys)
    for module in (openai, experts, ops, tokenize, lora):
        app.include_router(module.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]  # FastAPI's documented override
    return app


def _reload_keys_on_sighup(service: Service) -> None:
    if service.keys is None:
        return
    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, service.keys.reload)
    except (NotImplementedError, RuntimeError, ValueError):   # not the main thread (tests), or no SIGHUP here
        pass


class OpsKey:
    """ASGI middleware for ``--ops-need-key``: /metrics, /docs and /openapi.json need a key too."""

    PATHS = OPS_PATHS

    def __init__(self, app, keys: list[str]) -> None:
        self.app, self.keys = app, set(keys)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"] in self.PATHS:
            header = dict(scope.get("headers", ())).get(b"authorization", b"").decode("latin-1")
            if bearer_token(header) not in self.keys:
                response = JSONResponse(errors.error_body("this endpoint needs an API key", 401), status_code=401)
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, with the 400 this server answers instead of the 422 FastAPI assumes."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                responses = operation.get("responses", {})
                invalid = responses.pop("422", None)
                if invalid is not None and "400" not in responses:
                    responses["400"] = {"description": "Invalid request",
                                        "content": {"application/json": {"schema": {
                                            "$ref": "#/components/schemas/ErrorResponse"}}}}
        app.openapi_schema = schema
    return app.openapi_schema
