"""The dense path's host cache tier: what the worker reads from experts, kept in host RAM (LRU by bytes)."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

from deltaserve.experts.expert import Expert


class HostDeltaCache:
    """What the dense path reads from experts, kept in host RAM (LRU by bytes, keyed by expert token and
    parameter): decoded float32 deltas for the merge loop, and sparse experts' kept entries (flat int64
    indices and stored values) for the add-in-place path — a DARE 1 % expert of SmolLM2 is ~16 MB of
    entries, and decoding them (Elias-Fano) took 0.35 s of a 0.6 s add per swap (measured)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = max(0, int(budget_bytes))
        self._items: OrderedDict[tuple[str, str, str], tuple[Tensor, ...]] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, token: str, expert: Expert, name: str) -> Tensor:
        """``name``'s delta, decoded densely in float32."""
        return self._cached((token, name, "dense"), lambda: (expert.decode(name, dtype=torch.float32),))[0]

    def entries(self, token: str, expert: Expert, name: str) -> tuple[Tensor, Tensor]:
        """``name``'s kept entries of a sparse expert (``Expert.entries``)."""
        return self._cached((token, name, "entries"), lambda: expert.entries(name))

    def _cached(self, key: tuple[str, str, str], make) -> tuple[Tensor, ...]:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
            self.hits += 1
            return hit
        self.misses += 1
        value = tuple(make())
        size = _nbytes(value)
        if size <= self.budget:
            self._items[key] = value
            self.bytes += size
            while self.bytes > self.budget:
                _, old = self._items.popitem(last=False)
                self.bytes -= _nbytes(old)
                self.evictions += 1
        return value

    def drop(self, token: str) -> None:
        for key in [k for k in self._items if k[0] == token]:
            self.bytes -= _nbytes(self._items.pop(key))
            self.evictions += 1


def _nbytes(tensors: tuple[Tensor, ...]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
