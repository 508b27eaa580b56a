"""NPS's pruning step: rank tau's entries by magnitude into ``bands`` equal-size groups (band 0 = the
largest), scale band m by w_m, keep the top-``density`` fraction of the reweighted vector. Pure tensor
functions; experts.nps searches the weights. Global banding ranks all tensors together (the
``BandPruner`` fast path sorts once and answers every candidate from that sort), per-tensor banding
ranks and prunes each tensor on its own."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from deltaserve.experts.hfmodel import IndexedDelta
from deltaserve.experts.sparsify import check_density, magnitude, magnitude_global, top_count


def band_ids(tensors: Mapping[str, Tensor], bands: int, per_tensor: bool = False) -> dict[str, Tensor]:
    """Band index (0 = largest magnitudes) of every entry, by magnitude rank.

    Ranks are split into ``bands`` groups of equal size (the last may be one
    entry larger or smaller); ties in magnitude go to the earlier position.
    """
    if bands < 1:
        raise ValueError(f"bands must be >= 1, got {bands}")
    if per_tensor:
        return {name: _band_ids_flat(t.reshape(-1), bands).reshape(t.shape) for name, t in tensors.items()}
    flat = torch.cat([t.reshape(-1) for t in tensors.values()])
    ids = _band_ids_flat(flat, bands)
    out, start = {}, 0
    for name, tensor in tensors.items():
        out[name] = ids[start : start + tensor.numel()].reshape(tensor.shape)
        start += tensor.numel()
    return out


def _band_ids_flat(flat: Tensor, bands: int) -> Tensor:
    order = torch.argsort(flat.abs().float(), descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return (ranks * bands // max(1, order.numel())).to(torch.int8 if bands <= 127 else torch.int32)


def nps_prune(
    tensors: Mapping[str, Tensor],
    bands_of: Mapping[str, Tensor],
    weights: Tensor | list[float] | tuple[float, ...],
    density: float,
    per_tensor: bool = False,
) -> dict[str, Tensor]:
    """Reweight each entry by its band's weight, then keep the top-``density`` by magnitude."""
    check_density(density)
    w = torch.as_tensor(weights, dtype=torch.float32)
    reweighted = {name: t * w[bands_of[name].long()].to(t.dtype) for name, t in tensors.items()}
    if per_tensor:
        return {name: magnitude(t, density) for name, t in reweighted.items()}
    return magnitude_global(reweighted, density)


class BandPruner:
    """``nps_prune`` (global banding) for many weight vectors over one tau: sort once, then per candidate
    only the bands' leading entries are ranked.

    The bands are contiguous runs of the descending magnitude order, and a band's weight scales all its
    entries alike, so every candidate keeps a *prefix* of each band. The k-th largest reweighted value is
    found among the first k entries of each band (at most ``bands * k`` values instead of all n), and the
    kept entries are written by index: O(bands * k) per candidate instead of a pass over all 135 M entries
    of SmolLM2 plus a selection over them. Same kept set and values as ``nps_prune`` except how exact ties
    at the cut are broken (either way exactly k entries are kept).
    """

    def __init__(self, tensors: Mapping[str, Tensor], bands: int, density: float):
        if bands < 1:
            raise ValueError(f"bands must be >= 1, got {bands}")
        self.shapes = {name: t.shape for name, t in tensors.items()}
        self.dtypes = {name: t.dtype for name, t in tensors.items()}
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors.values()) else torch.float32
        flat = torch.cat([t.detach().reshape(-1).to(dtype) for t in tensors.values()])
        n = flat.numel()
        self.order = torch.argsort(flat.abs(), descending=True, stable=True)   # rank -> position
        self.values = flat[self.order]                                        # tau in rank order
        self.magnitude = self.values.abs()
        self.k = top_count(n, density)
        # band b holds the ranks r with r * bands // n == b (as band_ids): [ceil(b n / B), ceil((b + 1) n / B))
        self.bounds = [-(-b * n // bands) for b in range(bands + 1)]
        self.n = n
        self.starts = [0, *itertools.accumulate(shape.numel() for shape in self.shapes.values())]  # offsets, n
        self.tensor_of_rank: Tensor | None = None   # which tensor each rank's entry is in (for ``indexed``)

    def _kth_largest(self, heads: list[Tensor]) -> Tensor:
        """The k-th largest value over the (negated, ascending) heads, by bisection on the float's bits
        (non-negative floats order like their bit patterns): no selection over sorted data, whose quickselect
        degenerates (kthvalue over 10 M sorted values took 200 s)."""
        top = max(float(-h[0]) for h in heads if h.numel())
        dtype, itype = (torch.float64, torch.int64) if self.values.dtype == torch.float64 else (torch.float32,
                                                                                               torch.int32)
        lo, hi = 0, int(torch.tensor(top, dtype=dtype).view(itype))   # count(> bits(hi)) = 0 < k

        def count_above(bits: int) -> int:
            t = torch.tensor(bits, dtype=itype).view(dtype)
            return sum(int(torch.searchsorted(h, -t, side="left")) for h in heads)

        while lo < hi:                         # smallest bits with count(> value) < k: the k-th largest
            mid = (lo + hi) // 2
            if count_above(mid) < self.k:
                hi = mid
            else:
                lo = mid + 1
        return torch.tensor(lo, dtype=itype).view(dtype)

    def _gather(self, ranks: list[tuple[int, float, int]]) -> tuple[Tensor, Tensor]:
        """(positions in the concatenated tau, reweighted values) of the kept ranks, band by band."""
        return (torch.cat([self.order[lo:lo + count] for lo, _, count in ranks]),
                torch.cat([self.values[lo:lo + count] * wb for lo, wb, count in ranks]))

    def _kept_ranks(self, weights) -> list[tuple[int, float, int]]:
        """(first rank, weight, count) of each band's kept prefix."""
        w = [float(x) for x in weights]
        spans = [(lo, min(hi, lo + self.k)) for lo, hi in zip(self.bounds, self.bounds[1:])]
        # each band's head, reweighted: still descending, so negated it is ascending for searchsorted
        heads = [-(self.magnitude[lo:hi] * wb) for (lo, hi), wb in zip(spans, w)]
        cut = self._kth_largest(heads)
        above = [int(torch.searchsorted(h, -cut, side="left")) for h in heads]      # > cut
        at_most = [int(torch.searchsorted(h, -cut, side="right")) for h in heads]   # >= cut
        take, missing = list(above), self.k - sum(above)
        for b in range(len(take)):           # ties at the cut, band by band, until exactly k are kept
            extra = min(at_most[b] - above[b], max(missing, 0))
            take[b] += extra
            missing -= extra
        return [(lo, wb, count) for (lo, _), wb, count in zip(spans, w, take) if count]

    def __call__(self, weights) -> dict[str, Tensor]:
        positions, values = self._gather(self._kept_ranks(weights))
        out = torch.zeros(self.n, dtype=self.values.dtype)
        out[positions] = values
        result, start = {}, 0
        for name, shape in self.shapes.items():
            size = shape.numel()
            result[name] = out[start:start + size].view(shape).to(self.dtypes[name])
            start += size
        return result

    def indexed(self, weights) -> dict[str, IndexedDelta]:
        """The same pruned tau as ``__call__``, as positions and values per tensor (no dense zeros): what
        an objective that adds deltas by index (``accepts_indexed``) is given during the search."""
        if self.tensor_of_rank is None:   # built on first use: only the search needs it
            sizes = torch.tensor([shape.numel() for shape in self.shapes.values()])
            dtype = torch.int16 if len(self.shapes) < 2**15 else torch.int32
            self.tensor_of_rank = torch.repeat_interleave(torch.arange(len(sizes), dtype=dtype), sizes)[self.order]
        ranks = self._kept_ranks(weights)
        tensor = torch.cat([self.tensor_of_rank[lo:lo + count] for lo, _, count in ranks])
        # grouped by tensor: a stable sort of the small tensor ids (3x faster than sorting the positions)
        group = torch.sort(tensor, stable=True).indices
        positions, values = self._gather(ranks)
        positions, values = positions[group], values[group]
        cuts = [0, *itertools.accumulate(torch.bincount(tensor.int(), minlength=len(self.shapes)).tolist())]
        return {name: IndexedDelta(positions[a:b] - start, values[a:b].to(self.dtypes[name]), shape)
                for (name, shape), start, a, b in zip(self.shapes.items(), self.starts, cuts, cuts[1:])}


def nps_pruner(tensors: Mapping[str, Tensor], bands: int, density: float, per_tensor: bool = False
               ) -> Callable[[list[float]], dict[str, Tensor]]:
    """weights -> pruned tensors: the BandPruner fast path for global banding, nps_prune per tensor.
    Build it once and use it for the search and for the final expert (the sort is the expensive part)."""
    if not per_tensor:
        return BandPruner(tensors, bands, density)
    ids = band_ids(tensors, bands, per_tensor)
    return lambda w: nps_prune(tensors, ids, list(w), density, per_tensor)
