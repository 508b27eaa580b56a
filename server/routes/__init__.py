"""Thin route modules: each endpoint validates its body (pydantic), checks the key, and calls
server.service / server.serving. Errors are raised, never rendered here (server.errors)."""

from __future__ import annotations

from fastapi import Depends, Request

from deltaserve.server.auth import bearer_token, check_key
from deltaserve.server.exceptions import Forbidden, Unauthenticated
from deltaserve.server.service import Service
from deltaserve.server.tenants import current_caller


def get_service(request: Request) -> Service:
    return request.app.state.service


def _check_key(request: Request, admin: bool) -> None:
    service = request.app.state.service
    if service.keys is not None:   # scoped keys: server.limits.Tenancy identified the caller
        caller = current_caller()
        if caller is None:
            raise Unauthenticated("invalid API key" if bearer_token(request.headers.get("authorization"))
                                  else "missing bearer token: send 'Authorization: Bearer <key>'")
        if admin and caller.role == "inference":
            raise Forbidden("this key may not manage experts")
        return
    settings = service.settings
    check_key(request.headers.get("authorization"), settings.api_keys, settings.admin_keys, admin=admin)


async def _inference_key(request: Request) -> None:
    _check_key(request, admin=False)


async def _admin_key(request: Request) -> None:
    _check_key(request, admin=True)


INFERENCE = Depends(_inference_key)
ADMIN = Depends(_admin_key)
SERVICE = Depends(get_service)
