"""The HTTP app: OpenAI-compatible inference plus expert management, on FastAPI.

``create_app(settings, engine=..., routing=...)`` wires the pieces: the
:class:`server.service.Service` (store, engine, router, metrics), the error
table (server.errors), and the route modules (server.routes: OpenAI endpoints,
expert admin, ops). Pass a fake ``engine`` to test the HTTP layer in-process.

Auth: with ``api_keys`` set, inference and reads need ``Authorization: Bearer
<key>``; with ``admin_keys`` set, expert writes need an admin key (admin keys
also work for inference). With no keys configured the API is open (the demo).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request

from server import errors
from server.engine import EngineProtocol
from server.routes import experts, openai, ops
from server.service import Service
from server.settings import ServerSettings

INFERENCE_PATHS = ("/v1/completions", "/v1/chat/completions")


def create_app(settings: ServerSettings, *, engine: EngineProtocol | None = None, routing: Any = None,
               on_ready: Callable[[], None] | None = None) -> FastAPI:
    service = Service(settings, engine=engine, routing=routing)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        poller = asyncio.create_task(service.poll_store())
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            poller.cancel()
            await service.engine.shutdown()

    app = FastAPI(title="deltaserve", version="0.1.0", lifespan=lifespan)
    app.state.service = service

    def count_failure(request: Request, status: int) -> None:
        if request.url.path in INFERENCE_PATHS:
            service.metrics.requests.labels("other", "none", str(status)).inc()

    errors.install(app, count_failure)
    for module in (openai, experts, ops):
        app.include_router(module.router)
    return app
