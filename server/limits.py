"""Per-key limits and the ASGI middleware that identifies each request's caller (``--key-file``).

``Tenancy`` runs before the routes: it reads the bearer key, turns it into a ``server.tenants.Caller`` (set in
``server.tenants.CALLER`` for the rest of the request), and enforces the key's limits on every endpoint but
/health and the ops endpoints:

* ``rpm``: requests started in the last 60 s;
* ``tpm``: prompt + completion tokens of requests finished in the last 60 s (charged when a request finishes,
  so one request may overshoot; the next one waits);
* ``max_in_flight``: requests being answered, streams included, until their last byte.

Over a limit: 429 in OpenAI's error shape (``type: rate_limit_exceeded``) with ``Retry-After`` (whole seconds).
Each key has its own window; tenants never share one. Ops endpoints (/metrics, /docs, /openapi.json) need a
global admin key: /metrics names experts. Health probes stay open.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from deltaserve.server.auth import bearer_token
from deltaserve.server.errors import error_body
from deltaserve.server.tenants import CALLER, Caller, KeyRing

WINDOW_S = 60.0
OPS_PATHS = ("/metrics", "/docs", "/openapi.json", "/redoc")
UNLIMITED = ("/health",)   # probes, and the ops paths above


@dataclass
class Usage:
    """One key's last minute: request start times, (finish time, tokens), and requests in flight."""

    starts: deque = field(default_factory=deque)
    tokens: deque = field(default_factory=deque)
    token_sum: int = 0
    in_flight: int = 0

    def expire(self, now: float) -> None:
        while self.starts and self.starts[0] <= now - WINDOW_S:
            self.starts.popleft()
        while self.tokens and self.tokens[0][0] <= now - WINDOW_S:
            self.token_sum -= self.tokens.popleft()[1]


class Limiter:
    """Sliding one-minute windows per key (``check`` then ``release`` around each request; ``charge`` tokens)."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self._usage: dict[str, Usage] = {}

    def usage(self, key_id: str) -> Usage:
        return self._usage.setdefault(key_id, Usage())

    def check(self, caller: Caller) -> tuple[str, float] | None:
        """None and the request counted (in flight until ``release``), or (the limit hit, seconds to wait)."""
        now = self.clock()
        u = self.usage(caller.key_id)
        u.expire(now)
        if caller.max_in_flight and u.in_flight >= caller.max_in_flight:
            return "in_flight", 1.0
        if caller.rpm and len(u.starts) >= caller.rpm:
            return "rpm", u.starts[len(u.starts) - caller.rpm] + WINDOW_S - now
        if caller.tpm and u.token_sum >= caller.tpm:
            return "tpm", self._tokens_free_at(u, caller.tpm) - now
        u.starts.append(now)
        u.in_flight += 1
        return None

    @staticmethod
    def _tokens_free_at(u: Usage, limit: int) -> float:
        """When enough of the window's tokens expire for the sum to drop below ``limit``."""
        left = u.token_sum
        for at, n in u.tokens:
            left -= n
            if left < limit:
                return at + WINDOW_S
        return u.tokens[-1][0] + WINDOW_S if u.tokens else 0.0

    def release(self, caller: Caller) -> None:
        u = self.usage(caller.key_id)
        u.in_flight = max(0, u.in_flight - 1)

    def charge(self, caller: Caller, tokens: int) -> None:
        if tokens > 0:
            u = self.usage(caller.key_id)
            u.tokens.append((self.clock(), tokens))
            u.token_sum += tokens


def too_many(limit: str, wait_s: float) -> JSONResponse:
    wait = max(1, math.ceil(wait_s))
    what = {"rpm": "requests per minute", "tpm": "tokens per minute", "in_flight": "requests in flight"}[limit]
    return JSONResponse(error_body(f"rate limit reached for this key ({what}); retry after {wait} s", 429),
                        status_code=429, headers={"Retry-After": str(wait)})


def _unauthorised(message: str, status: int) -> JSONResponse:
    return JSONResponse(error_body(message, status), status_code=status)


class Tenancy:
    """ASGI middleware: the caller of each request, its limits, and global-admin-only ops endpoints."""

    def __init__(self, app: Any, ring: KeyRing, limiter: Limiter, metrics: Any) -> None:
        self.app, self.ring, self.limiter, self.metrics = app, ring, limiter, metrics

    async def identify(self, scope: dict) -> Caller | None:
        header = dict(scope.get("headers", ())).get(b"authorization", b"").decode("latin-1")
        token = bearer_token(header)
        if not token:
            return None
        self.ring.maybe_reload()
        entry, known = self.ring.entry_for(token)
        if entry is None:
            return None
        if not known and not await asyncio.to_thread(self.ring.verify, entry, token):
            return None
        return self.ring.caller(entry)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        caller = await self.identify(scope)
        if path in OPS_PATHS and (caller is None or not caller.is_global):
            status = 401 if caller is None else 403
            return await _unauthorised("this endpoint needs a global admin key", status)(scope, receive, send)
        if caller is None or path in UNLIMITED or path in OPS_PATHS:
            token = CALLER.set(caller)
            try:
                return await self.app(scope, receive, send)
            finally:
                CALLER.reset(token)
        await self._limited(caller, scope, receive, send)

    async def _limited(self, caller: Caller, scope, receive, send) -> None:
        over = self.limiter.check(caller)
        if over is not None:
            self.metrics.tenant_rejections.labels(caller.label, over[0]).inc()
            return await too_many(*over)(scope, receive, send)
        self.metrics.tenant_requests.labels(caller.label).inc()
        token = CALLER.set(caller)
        try:
            await self.app(scope, receive, send)
        finally:
            CALLER.reset(token)
            self.limiter.release(caller)
