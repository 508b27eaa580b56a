"""Keep the engine alive: notice its death, restart it with back-off, or exit so Kubernetes restarts us.

While the engine is down, requests get a fast 503 (server.engine raises
``EngineUnavailable``) and ``/health`` answers 503. A restart builds a new vLLM
engine and re-reads the store; after ``max_restarts`` failed attempts in a row
the process exits with a non-zero status instead of serving 503s forever.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("deltaserve")
EXIT_ENGINE_LOST = 3


class EngineSupervisor:
    def __init__(self, engine: Any, metrics: Any, *, on_restart: Callable[[], Awaitable[None]] | None = None,
                 poll_s: float = 1.0, max_restarts: int = 3, backoff_s: tuple[float, ...] = (1.0, 5.0, 15.0),
                 exit: Callable[[int], None] = os._exit) -> None:
        self.engine, self.metrics = engine, metrics
        self.on_restart = on_restart
        self.poll_s, self.max_restarts, self.backoff_s = poll_s, max_restarts, backoff_s
        self._exit = exit

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            if self.engine.alive or self.engine.restarting:
                continue
            self.metrics.engine_up.set(0)
            log.error("the engine died; restarting it")
            await self.recover()

    async def recover(self) -> None:
        for attempt in range(self.max_restarts):
            try:
                await self.engine.restart()
            except Exception:  # noqa: BLE001 - any failure to start is retried, then fatal
                delay = self.backoff_s[min(attempt, len(self.backoff_s) - 1)]
                log.exception("engine restart %d/%d failed; next try in %.0f s", attempt + 1, self.max_restarts,
                              delay)
                await asyncio.sleep(delay)
                continue
            self.metrics.engine_restarts.inc()
            self.metrics.engine_up.set(1)
            log.warning("the engine is back (restart %d)", attempt + 1)
            if self.on_restart is not None:
                await self.on_restart()
            return
        log.critical("the engine could not be restarted %d times in a row; exiting", self.max_restarts)
        self._exit(EXIT_ENGINE_LOST)
