"""Recipe-aware admission for the one set of weights the engine holds.

Every request needs a *weight state* (any hashable; server.engine uses
``WeightState``): the dense path's recipe, or the base weights for base-model
and LoRA-path requests. Requests that need
the active state are admitted at once and batch together in vLLM. Requests for
another state wait. The policy:

1. While the active state has requests in flight, new requests for it are
   admitted, unless some waiting request has waited longer than ``max_wait``:
   then the active state stops admitting (it *drains*).
2. When nothing is in flight and requests wait, switch to the state of the
   oldest waiting request (FIFO across groups), apply it, and admit every
   request waiting for it at once.

So a busy recipe keeps the engine only ``max_wait`` beyond the arrival of a
request for another recipe: no state starves, and back-to-back requests for
one recipe never pay a swap. ``max_wait = 0`` gives strict FIFO groups.
The switch itself (``apply``) pauses vLLM with ``mode="wait"``, rewrites the
touched weights and resets the prefix cache (server.engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar


UNKNOWN = object()   # the weights' state after a failed apply
S = TypeVar("S", bound=Hashable)   # the weight states that ``apply`` takes


@dataclass
class _Waiter(Generic[S]):
    state: S
    payload: Any
    since: float
    future: asyncio.Future = field(repr=False)


class WeightScheduler(Generic[S]):
    def __init__(self, apply: Callable[[S, Any], Awaitable[None]], *, max_wait_s: float = 0.5,
                 initial_state: Hashable = "") -> None:
        self._apply = apply
        self.max_wait_s = max_wait_s
        self.active = initial_state   # a state of S, or UNKNOWN after a failed apply
        self.inflight = 0
        self._waiting: deque[_Waiter[S]] = deque()
        self._switching = False
        self._timer: asyncio.TimerHandle | None = None

    # ------------------------------------------------------------------ public
    @contextlib.asynccontextmanager
    async def hold(self, state: S, payload: Any = None) -> AsyncIterator[None]:
        """Run the body while the engine's weights are in ``state`` (``payload`` is passed to apply)."""
        await self._acquire(state, payload)
        try:
            yield
        finally:
            self.inflight -= 1
            self._kick()

    def reset(self, error: Exception, state: Hashable) -> None:
        """The weights were reset to ``state`` behind our back (an engine restart): fail every waiting
        request with ``error`` and admit from ``state`` on."""
        for w in list(self._waiting):
            self._waiting.remove(w)
            if not w.future.done():
                w.future.set_exception(error)
        self.active = state

    def waiting(self) -> dict[S, int]:
        counts: dict[S, int] = {}
        for w in self._waiting:
            counts[w.state] = counts.get(w.state, 0) + 1
        return counts

    def waiting_payloads(self) -> list[Any]:
        """The payloads of the waiting requests, oldest first."""
        return [w.payload for w in self._waiting]

    # ------------------------------------------------------------------ internals
    def _draining(self, now: float) -> bool:
        return any(w.state != self.active and now - w.since >= self.max_wait_s for w in self._waiting)

    async def _acquire(self, state: S, payload: Any) -> None:
        now = time.monotonic()
        if state == self.active and not self._switching and not self._draining(now):
            self.inflight += 1
            return
        waiter = _Waiter(state, payload, now, asyncio.get_running_loop().create_future())
        self._waiting.append(waiter)
        self._kick()
        try:
            await waiter.future
        except asyncio.CancelledError:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
            elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
                self.inflight -= 1   # admitted just as the client went away
                self._kick()
            raise

    def _kick(self) -> None:
        if self._switching or not self._waiting:
            return
        now = time.monotonic()
        same = [w for w in self._waiting if w.state == self.active]
        if same and not self._draining(now):
            self._admit(self.active)          # they arrived while we were switching or draining
        if self.inflight > 0 or not self._waiting:
            self._arm_timer(now)
            return
        target = self._waiting[0]
        if target.state == self.active:
            self._admit(self.active)
            return
        self._switching = True
        asyncio.get_running_loop().create_task(self._switch(target.state, target.payload))

    def _arm_timer(self, now: float) -> None:
        """Re-check when the oldest foreign waiter reaches max_wait (so admission stops then)."""
        foreign = [w.since for w in self._waiting if w.state != self.active]
        if not foreign or self._timer is not None:
            return
        delay = max(0.0, min(foreign) + self.max_wait_s - now)

        def fire() -> None:
            self._timer = None
            self._kick()
        self._timer = asyncio.get_running_loop().call_later(delay, fire)

    async def _switch(self, state: S, payload: Any) -> None:
        try:
            await self._apply(state, payload)
            self.active = state
        except (Exception, asyncio.CancelledError) as err:  # noqa: BLE001 - fails the requests that wanted it, not the server
            self.active = UNKNOWN   # a failed apply may have left any weights: the next request applies its own
            for w in [w for w in self._waiting if w.state == state]:
                self._waiting.remove(w)
                if not w.future.done():
                    w.future.set_exception(err)
        finally:
            self._switching = False
        self._admit(self.active)
        self._kick()

    def _admit(self, state: Hashable) -> None:
        for w in [w for w in self._waiting if w.state == state]:
            self._waiting.remove(w)
            if not w.future.done():
                self.inflight += 1
                w.future.set_result(None)
