"""Work that many concurrent callers need done once after their change: a store rescan, a router refit.

Eight registrations in flight would otherwise each rescan the store and refit the router, one after another
(O(store) each). ``Coalesced.run(work)`` returns once a run of ``work`` that *started after the call* has finished:
the first caller runs it, callers arriving meanwhile wait and share the next run (group commit).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class Coalesced:
    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._asked = 0     # calls so far
        self._covered = 0   # calls made before the last finished run started

    async def run(self, work: Callable[[], Awaitable[object]]) -> bool:
        """Wait for a run of ``work`` that starts after this call; True if this call ran it itself."""
        self._asked += 1
        ticket = self._asked
        async with self._lock:
            if self._covered >= ticket:
                return False
            covered = self._asked
            await work()
            self._covered = covered
            return True
