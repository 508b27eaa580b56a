"""RouteBatcher: concurrent routing calls share one router call (one encoder batch).

Routing each request alone in a worker thread would run N encoder calls on one
prompt each, competing for the same cores (and the event loop's small default
thread pool would queue the rest). Encoding a batch of prompts costs far less
than encoding them one by one, so the batcher collects
the texts that arrive within ``window_s`` of the first one (at most
``max_batch``), routes them with one ``RoutingService.route`` call in one
thread, and hands each caller its own decision. Callers scoped to some experts (tenants: server.scoping) are
routed among those only, one routing call per distinct scope in the batch. While a batch is being routed
the next one collects, so at most one routing call runs at a time.

With ``max_pending``, a text that would queue behind that many others is refused at once (``RouterBusy``,
with an estimate of when to retry): the server answers 503 + ``Retry-After`` instead of letting callers wait
past their timeouts (the uncertainty router, which runs the engine per call, has a bound by default).

A lone request pays at most ``window_s`` (2 ms by default) for the batching.
Repeated prompts are not re-encoded: the encoders cache features by text
(router.features.CachedEncoder). Each decision's ``latency_s`` is that
caller's own wall time: waiting for its batch plus routing it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence

from deltaserve.router.base import Decision

DEFAULT_WINDOW_S = 0.002
DEFAULT_MAX_BATCH = 64


class RouterBusy(RuntimeError):
    """More texts are waiting to be routed than ``max_pending``; ``retry_after_s`` estimates when to retry."""

    def __init__(self, pending: int, retry_after_s: float) -> None:
        super().__init__(f"{pending} texts are waiting to be routed")
        self.pending, self.retry_after_s = pending, retry_after_s


class RouteBatcher:
    def __init__(self, service, *, window_s: float = DEFAULT_WINDOW_S, max_batch: int = DEFAULT_MAX_BATCH,
                 max_pending: int | None = None):
        if window_s < 0 or max_batch < 1 or (max_pending is not None and max_pending < 1):
            raise ValueError(f"window_s must be >= 0, max_batch and max_pending >= 1, got {window_s}, {max_batch}, "
                             f"{max_pending}")
        self.service = service
        self.window_s = window_s
        self.max_batch = max_batch
        self.max_pending = max_pending   # None: unbounded
        self.last_call_s = 0.0           # how long the last routing call took (for RouterBusy's estimate)
        self._pending: list[tuple[str, float, asyncio.Future, frozenset[str] | None]] = []
        self._runner: asyncio.Task | None = None
        self.batches = 0      # routing calls made
        self.routed = 0       # texts routed

    async def route(self, text: str, allowed: frozenset[str] | None = None) -> Decision:
        """The decision for one text, among the ``allowed`` experts only (None: all); raises what the router
        raised for its batch."""
        if self.max_pending is not None and len(self._pending) >= self.max_pending:
            calls = len(self._pending) / self.max_batch + 1
            raise RouterBusy(len(self._pending), max(1.0, calls * self.last_call_s))
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((text, time.perf_counter(), future, allowed))
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run())
        return await future

    async def _run(self) -> None:
        while self._pending:
            if len(self._pending) < self.max_batch and self.window_s > 0:
                await asyncio.sleep(self.window_s)
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch:]
            batch = [item for item in batch if not item[2].cancelled()]
            if not batch:
                continue
            started = time.perf_counter()
            try:
                decisions = await asyncio.to_thread(self._route, batch)
            except Exception as err:  # noqa: BLE001 - every caller of the batch gets the router's error
                for _, _, future, _ in batch:
                    if not future.done():
                        future.set_exception(err)
                continue
            self.batches += 1
            self.routed += len(batch)
            done = time.perf_counter()
            self.last_call_s = done - started
            for (_, since, future, _), decision in zip(batch, decisions):
                if not future.done():
                    future.set_result(dataclasses.replace(decision, latency_s=done - since))

    def _route(self, batch: list) -> list[Decision]:
        """One routing call per distinct ``allowed`` set in the batch (one for all when no caller is scoped)."""
        groups: dict[frozenset[str] | None, list[int]] = {}
        for i, item in enumerate(batch):
            groups.setdefault(item[3], []).append(i)
        out: list[Decision | None] = [None] * len(batch)
        for allowed, rows in groups.items():
            texts = [batch[i][0] for i in rows]
            decided = self.service.route(texts) if allowed is None else self.service.route(texts, allowed=allowed)
            for i, decision in zip(rows, decided):
                out[i] = decision
        return out  # type: ignore[return-value]

    async def route_many(self, texts: Sequence[str]) -> list[Decision]:
        return list(await asyncio.gather(*(self.route(t) for t in texts)))
