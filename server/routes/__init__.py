"""Thin route modules: each endpoint validates its body (pydantic), checks the key, and calls
server.service / server.serving. Errors are raised, never rendered here (server.errors)."""

from __future__ import annotations

from fastapi import Depends, Request

from deltaserve.server.errors import APIError
from deltaserve.server.service import Service


def get_service(request: Request) -> Service:
    return request.app.state.service


def _check_key(request: Request, admin: bool) -> None:
    settings = request.app.state.service.settings
    required = settings.admin_keys if admin else settings.api_keys
    if not required:
        return
    allowed = settings.admin_keys if admin else settings.api_keys + settings.admin_keys
    header = request.headers.get("authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not token:
        raise APIError(401, "missing bearer token: send 'Authorization: Bearer <key>'")
    if token not in allowed:
        if admin and token in settings.api_keys:
            raise APIError(403, "this key may not manage experts")
        raise APIError(401, "invalid API key")


async def _inference_key(request: Request) -> None:
    _check_key(request, admin=False)


async def _admin_key(request: Request) -> None:
    _check_key(request, admin=True)


INFERENCE = Depends(_inference_key)
ADMIN = Depends(_admin_key)
SERVICE = Depends(get_service)
