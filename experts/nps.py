"""NPS — Neural Parameter Search: band-reweighted magnitude pruning of a task vector.

Method: rank tau's entries by magnitude and split them
into ``bands`` equal-size groups (band 0 = the largest magnitudes); scale band
m by a weight w_m; keep the top-``density`` fraction of the *reweighted*
vector by magnitude. The M weights are searched gradient-free with CMA-ES
(pycma) to maximise a calibration objective of the pruned vector. The
all-ones weights are plain magnitude pruning; they are scored first and the
search returns the best point it saw, so on the calibration objective NPS is
never worse than magnitude pruning at the same density. It stops early after
``patience`` generations without a better candidate, and when
the best candidate reaches the objective's ``maximum`` (when it declares one:
``DeltaObjective``'s is every calibration answer exact), since no candidate can
score higher, and an objective that ``accepts_indexed`` is handed candidates as
positions + values (``IndexedDelta``) instead of dense tensors of mostly zeros.

Banding is global (one ranking over all tensors) or per tensor; pruning
follows the same scope (experts.nps_bands). Everything here is pure: the objective is a callable
``pruned deltas -> score`` supplied by the caller (e.g. exact-match accuracy
of base + pruned deltas on the task's calibration split).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor
from tqdm import tqdm

from deltaserve.experts.nps_bands import nps_pruner
from deltaserve.experts.sparsify import check_density

Objective = Callable[[dict[str, Tensor]], float]
log = logging.getLogger("deltaserve.nps")


@dataclass(frozen=True)
class NPSResult:
    weights: tuple[float, ...]
    score: float
    baseline_score: float  # the all-ones weights (plain magnitude pruning)
    history: list[float] = field(default_factory=list)  # best score after each generation
    evaluations: int = 0
    seconds: float = 0.0
    stop_reason: str = ""  # why the search ended: "generations", or pycma's termination criteria


def _check_search(density: float, generations: int, population: int | None, max_weight: float,
                  patience: int | None = None) -> None:
    check_density(density)
    if generations < 1:
        raise ValueError(f"generations must be >= 1, got {generations}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be >= 1 generation, got {patience}")
    if population is not None and population < 2:
        raise ValueError(f"population must be >= 2 (CMA-ES ranks candidates), got {population}")
    if not max_weight >= 1.0:
        raise ValueError(f"max_weight must be >= 1 so the all-ones start (magnitude pruning) is in bounds, "
                         f"got {max_weight}")


def _scorer(prune: Callable, objective: Objective) -> tuple[Callable[[list[float]], float], float | None]:
    """weights -> score, and the best score the objective can give (None: it does not say). An objective that
    ``accepts_indexed`` is handed the candidates as positions + values (no dense tensors of zeros)."""
    candidate = getattr(prune, "indexed", prune) if getattr(objective, "accepts_indexed", False) else prune
    return (lambda w: float(objective(candidate(w)))), getattr(objective, "maximum", None)


@dataclass
class _Progress:
    """The search so far: the best weights and score (starting from magnitude pruning's), per-generation bests."""

    best_w: tuple[float, ...]
    best: float
    evaluations: int = 1
    history: list[float] = field(default_factory=list)
    seen: set[float] = field(default_factory=set)
    stale: int = 0        # generations since the best improved

    def __post_init__(self) -> None:
        self.baseline = self.best

    def add(self, candidates, scores: list[float]) -> None:
        self.evaluations += len(candidates)
        self.seen.update(scores)
        top = max(range(len(scores)), key=scores.__getitem__)
        if scores[top] > self.best:
            self.best, self.best_w, self.stale = scores[top], tuple(float(x) for x in candidates[top]), 0
        else:
            self.stale += 1
        self.history.append(self.best)

    def done(self, maximum: float | None, patience: int | None) -> str | None:
        """Why to stop now, or None: no candidate can score higher, or none has improved for a while."""
        if maximum is not None and self.best >= maximum:
            return "reached the objective's maximum"
        if patience is not None and self.stale >= patience:
            return f"no better candidate in {patience} generations"
        return None


def nps_search(
    tensors: Mapping[str, Tensor],
    objective: Objective,
    *,
    density: float = 0.05,
    bands: int = 8,
    per_tensor: bool = False,
    generations: int = 20,
    patience: int | None = None,
    population: int | None = None,
    sigma0: float = 0.5,
    max_weight: float = 4.0,
    seed: int = 0,
    progress: bool = True,
    pruner: Callable[[list[float]], dict[str, Tensor]] | None = None,
) -> NPSResult:
    """CMA-ES over band weights in [0, max_weight]; maximises ``objective``. ``patience``: stop after that many
    generations without a better candidate. ``pruner``: an ``nps_pruner`` of the same tensors, bands, density
    and banding, to reuse it afterwards (else one is built)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pycma warns when matplotlib is absent
        import cma

    _check_search(density, generations, population, max_weight, patience)
    started = time.perf_counter()
    prune = pruner if pruner is not None else nps_pruner(tensors, bands, density, per_tensor)
    score, maximum = _scorer(prune, objective)
    ones = [1.0] * bands
    run = _Progress(tuple(ones), score(ones))
    run.seen.add(run.best)
    if maximum is not None and run.best >= maximum:
        stop_reason = "magnitude pruning reaches the objective's maximum"
    else:
        stop_reason = _run_cma(cma, run, score, maximum, bands=bands, generations=generations, patience=patience,
                               population=population, sigma0=sigma0, max_weight=max_weight, seed=seed,
                               progress=progress)
    if len(run.seen) == 1:
        stop_reason += "; flat objective: every candidate scored the same, so this is magnitude pruning"
    log.info("nps stopped after %d generations (%s): best %.6f vs magnitude pruning %.6f",
             len(run.history), stop_reason, run.best, run.baseline)
    return NPSResult(run.best_w, run.best, run.baseline, run.history, run.evaluations,
                     time.perf_counter() - started, stop_reason)


def _run_cma(cma, run: _Progress, score: Callable[[list[float]], float], maximum: float | None, *, bands: int,
             generations: int, patience: int | None, population: int | None, sigma0: float, max_weight: float,
             seed: int, progress: bool) -> str:
    """The CMA-ES generations from the all-ones start; returns why they stopped (``run`` holds the best)."""
    stop_reason = "generations"
    options = {"seed": seed + 1, "maxiter": generations, "bounds": [0.0, max_weight], "verbose": -9,
               **({"popsize": population} if population else {})}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pycma warns about e.g. flat fitness on tiny problems
        es = cma.CMAEvolutionStrategy([1.0] * bands, sigma0, options)
        for generation in tqdm(range(generations), desc="nps", disable=not progress, leave=False):
            candidates = es.ask()
            scores = [score(c) for c in candidates]
            es.tell(candidates, [-s for s in scores])
            run.add(candidates, scores)
            log.info("nps generation %d/%d: best %.6f (magnitude pruning %.6f), %d evaluations",
                     generation + 1, generations, run.best, run.baseline, run.evaluations)
            if reason := run.done(maximum, patience):
                return reason
            if es.stop():
                return ", ".join(sorted(k for k in es.stop() if k != "maxiter")) or "generations"
    return stop_reason
