"""The big listings (``GET /v1/models``, ``GET /v1/experts``) built once per state of the store, not per request.

With 10,000 experts a listing is ~5 MB of JSON and building its cards (each expert's plan and exemplar count)
takes about a second; it changes only when the store, the named recipes or the engine change. ``Listings`` keeps
each listing's cards and rendered JSON under a key of that state (``state_key``) and rebuilds on the first request
after it moved. A page (``limit`` / ``after``, OpenAI's list shape) is cut from the cached cards.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Hashable, Sequence
from typing import Any

from fastapi.responses import Response
from pydantic import BaseModel


def state_key(service: Any) -> Hashable:
    """Changes whenever a listing may: a store refresh replaces the engine's experts (a new dict) and moves the
    generation, a named-recipe change replaces ``service.named``, an engine restart may change each path."""
    engine = service.engine
    return (engine.generation, id(engine.experts), id(service.named), tuple(sorted(engine.unavailable)),
            getattr(engine, "restarts", 0), id(service.routing))


class Listings:
    def __init__(self) -> None:
        self._cached: dict[Hashable, tuple[Hashable, list[Any], bytes]] = {}

    def cards(self, name: Hashable, key: Hashable, build: Callable[[], list[Any]],
              wrap: Callable[[list[Any]], BaseModel]) -> tuple[list[Any], bytes]:
        """(the cards, the whole listing as JSON) of listing ``name`` at state ``key``; ``build()`` makes the cards
        (sorted by id) and ``wrap(cards)`` the listing when the state moved."""
        hit = self._cached.get(name)
        if hit is None or hit[0] != key:
            cards = build()
            hit = self._cached[name] = (key, cards, wrap(cards).model_dump_json().encode())
        return hit[1], hit[2]


def json_response(body: bytes) -> Response:
    return Response(content=body, media_type="application/json")


def page(cards: Sequence[Any], limit: int | None, after: str | None) -> tuple[list[Any], bool]:
    """The cards whose id sorts after ``after`` (a cursor: it need not still exist), at most ``limit`` of them,
    and whether more follow."""
    start = 0 if after is None else bisect.bisect_right([c.id for c in cards], after)
    end = len(cards) if limit is None else min(len(cards), start + limit)
    return list(cards[start:end]), end < len(cards)
