"""NPS — Neural Parameter Search: band-reweighted magnitude pruning of a task vector.

Method (see shared/DESIGN.md): rank tau's entries by magnitude and split them
into ``bands`` equal-size groups (band 0 = the largest magnitudes); scale band
m by a weight w_m; keep the top-``density`` fraction of the *reweighted*
vector by magnitude. The M weights are searched gradient-free with CMA-ES
(pycma) to maximise a calibration objective of the pruned vector. The
all-ones weights are plain magnitude pruning; they are scored first and the
search returns the best point it saw, so on the calibration objective NPS is
never worse than magnitude pruning at the same density.

Banding is global (one ranking over all tensors) or per tensor; pruning
follows the same scope. Everything here is pure: the objective is a callable
``pruned deltas -> score`` supplied by the caller (e.g. exact-match accuracy
of base + pruned deltas on the task's calibration split).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm import tqdm

from experts.sparsify import check_density, magnitude, magnitude_global

Objective = Callable[[dict[str, Tensor]], float]


@dataclass(frozen=True)
class NPSResult:
    weights: tuple[float, ...]
    score: float
    baseline_score: float  # the all-ones weights (plain magnitude pruning)
    history: list[float] = field(default_factory=list)  # best score after each generation
    evaluations: int = 0
    seconds: float = 0.0


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


def nps_search(
    tensors: Mapping[str, Tensor],
    objective: Objective,
    *,
    density: float = 0.05,
    bands: int = 8,
    per_tensor: bool = False,
    generations: int = 20,
    population: int | None = None,
    sigma0: float = 0.5,
    max_weight: float = 4.0,
    seed: int = 0,
    progress: bool = True,
) -> NPSResult:
    """CMA-ES over band weights in [0, max_weight]; maximises ``objective``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pycma warns when matplotlib is absent
        import cma

    check_density(density)
    if generations < 1:
        raise ValueError(f"generations must be >= 1, got {generations}")
    if population is not None and population < 2:
        raise ValueError(f"population must be >= 2 (CMA-ES ranks candidates), got {population}")
    if not max_weight >= 1.0:
        raise ValueError(f"max_weight must be >= 1 so the all-ones start (magnitude pruning) is in bounds, "
                         f"got {max_weight}")
    started = time.perf_counter()
    ids = band_ids(tensors, bands, per_tensor)

    def score(w) -> float:
        return float(objective(nps_prune(tensors, ids, list(w), density, per_tensor)))

    ones = [1.0] * bands
    best_w, best = tuple(ones), score(ones)
    baseline, evaluations, history = best, 1, []
    options = {"seed": seed + 1, "maxiter": generations, "bounds": [0.0, max_weight], "verbose": -9}
    if population:
        options["popsize"] = population
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pycma warns about e.g. flat fitness on tiny problems
        es = cma.CMAEvolutionStrategy(ones, sigma0, options)
        for _ in tqdm(range(generations), desc="nps", disable=not progress, leave=False):
            candidates = es.ask()
            scores = [score(c) for c in candidates]
            evaluations += len(candidates)
            es.tell(candidates, [-s for s in scores])
            top = max(range(len(scores)), key=scores.__getitem__)
            if scores[top] > best:
                best, best_w = scores[top], tuple(float(x) for x in candidates[top])
            history.append(best)
            if es.stop():
                break
    return NPSResult(best_w, best, baseline, history, evaluations, time.perf_counter() - started)
