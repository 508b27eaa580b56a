"""Merge methods over task vectors (deltas, not full weights): one registry.

Every registered method is ``fn(deltas, weights, **options) -> Tensor``: the
deltas are same-shape, same-dtype floating tensors tau_i, ``weights`` one real
number per delta, the options keyword-only with documented defaults. The result
is the merged delta; the caller adds it to the base, optionally times a global
lambda. Methods work per tensor (density, thresholds and signs are computed
within the one tensor they are given).

Register with ``@merge_method("name", OptionsModel)`` (experts.merge_registry);
look up with :func:`get_merge_method` (a miss lists the known names). Unknown or
invalid options raise ``ValueError`` naming the option and the valid ones.

:func:`experts.lora_merge.lora_concat` (the exact LoRA merge) takes factors,
not deltas, so it lives apart and is not in the registry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from deltaserve.experts.merge_registry import (DEFAULT_DENSITY, MERGE_METHODS, BreadcrumbsOptions, BreadcrumbsTiesOptions,
                                    DareOptions, DareTiesOptions, MergeMethod, Normalize, PcbOptions, SignMethod,
                                    SignSource, TiesOptions, get_merge_method, merge_method)
from deltaserve.experts.sparsify import breadcrumbs as breadcrumbs_sparsify
from deltaserve.experts.sparsify import check_density, check_tensor, dare, magnitude

__all__ = [
    "DEFAULT_DENSITY", "MERGE_METHODS", "check_numbers", "MergeMethod", "breadcrumbs", "breadcrumbs_ties", "dare_linear",
    "dare_ties", "elect_and_merge", "get_merge_method", "merge_method", "pcb", "pcb_scores",
    "task_arithmetic", "ties",
]  # fmt: skip


# -------------------------------------------------------------------------- checks


def _stack(deltas: Sequence[Tensor], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Validate inputs; return deltas stacked on dim 0 and weights shaped to broadcast."""
    if isinstance(deltas, Tensor) or not isinstance(deltas, Sequence) or not deltas:
        raise ValueError(f"deltas must be a non-empty sequence of tensors, got {type(deltas).__name__}")
    first = check_tensor(deltas[0], "deltas[0]")
    for i, delta in enumerate(deltas):
        check_tensor(delta, f"deltas[{i}]")
        if delta.shape != first.shape or delta.dtype != first.dtype:
            expected = f"{first.dtype} {tuple(first.shape)}"
            raise ValueError(f"deltas[{i}] is {delta.dtype} {tuple(delta.shape)}, expected {expected}")
    values = check_numbers(weights, "weights", len(deltas))
    stacked = torch.stack(list(deltas), dim=0)
    w = torch.tensor(values, dtype=first.dtype, device=first.device)
    return stacked, w.reshape((-1,) + (1,) * first.dim())


def check_numbers(values: Sequence[float] | Tensor, name: str, count: int) -> list[float]:
    """One finite real number per input; returned as floats."""
    if isinstance(values, Tensor):
        values = values.tolist()
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a sequence of numbers, got {type(values).__name__}")
    if len(values) != count:
        raise ValueError(f"{name} must have one entry per input ({count}), got {len(values)}")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name}[{i}] must be a finite number, got {value!r}")
    return [float(value) for value in values]


def _choice(value: object, name: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


# ----------------------------------------------------------------- TIES machinery


def elect_and_merge(
    sparse: Tensor,
    weights: Tensor,
    *,
    sign_method: SignMethod = "total",
    sign_source: SignSource = "weighted",
    normalize: Normalize = "weight",
) -> Tensor:
    """TIES sign election + disjoint merge of stacked (already sparsified) deltas.

    ``sparse`` is [n, ...] (one row per task), ``weights`` holds n numbers.
    voters = ``w_i * tau_i`` (``sign_source="weighted"``, mergekit) or
    ``tau_i`` (``"unweighted"``, PEFT). Elected sign = +1 where the score >= 0
    (a zero score elects +1, as both libraries do), else -1; score = sum of
    voters (``"total"``) or sum of their signs (``"frequency"``). Entry i
    agrees where sign(voter_i) == elected; exact zeros never agree. Merged =
    sum over agreeing of ``w_i * tau_i``, divided by the sum of agreeing
    weights (``normalize="weight"``, mergekit; 0 -> 1), by their count
    (``"count"``, PEFT; clamped to >= 1), or not at all (``"none"``).
    """
    _choice(sign_method, "sign_method", ("total", "frequency"))
    _choice(sign_source, "sign_source", ("weighted", "unweighted"))
    _choice(normalize, "normalize", ("weight", "count", "none"))
    weights = weights.reshape((-1,) + (1,) * (sparse.dim() - 1))
    weighted = sparse * weights
    voters = weighted if sign_source == "weighted" else sparse
    signs = voters.sign()
    score = voters.sum(dim=0) if sign_method == "total" else signs.sum(dim=0)
    elected = torch.where(score >= 0, 1.0, -1.0).to(signs.dtype)
    agree = signs == elected
    merged = (weighted * agree).sum(dim=0)
    if normalize == "none":
        return merged
    if normalize == "count":
        return merged / torch.clamp(agree.sum(dim=0), min=1.0)
    divisor = (weights * agree).sum(dim=0)
    return merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)


def _dare_all(
    deltas: Sequence[Tensor],
    density: float,
    generator: torch.Generator | None,
    masks: Sequence[Tensor] | None,
    rescale: bool,
    seed: int = 0,
) -> list[Tensor]:
    """DARE each delta in order: one stream from ``generator`` (else a new one seeded with ``seed``),
    or the injected ``masks``."""
    density = check_density(density)
    if generator is not None and masks is not None:
        raise ValueError("give only one of generator or masks, got both")
    if masks is not None and len(masks) != len(deltas):
        raise ValueError(f"masks must have one entry per delta ({len(deltas)}), got {len(masks)}")
    if generator is None and masks is None:
        generator = torch.Generator(device=deltas[0].device).manual_seed(seed)
    if not isinstance(rescale, bool):
        raise ValueError(f"rescale must be a bool, got {rescale!r}")
    return [
        dare(delta, density, generator, rescale=rescale, mask=None if masks is None else masks[i])
        for i, delta in enumerate(deltas)
    ]


# --------------------------------------------------------------------- the methods


@merge_method("task_arithmetic")
def task_arithmetic(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Task arithmetic: ``sum_i w_i * tau_i`` (= mergekit ``task_arithmetic``, PEFT ``task_arithmetic``)."""
    stacked, w = _stack(deltas, weights)
    return (stacked * w).sum(dim=0)


@merge_method("ties", TiesOptions)
def ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    density: float = DEFAULT_DENSITY,
    sign_method: SignMethod = "total",
    sign_source: SignSource = "weighted",
    normalize: Normalize = "weight",
) -> Tensor:
    """TIES: trim each tau_i to its top-``density`` by |x|, elect signs, disjoint mean.

    Trim: :func:`experts.sparsify.magnitude` (per tensor, k = max(1,
    int(density * numel))). Election and merge: :func:`elect_and_merge`.
    The defaults reproduce mergekit ``ties`` (``normalize=True``): election on
    the weighted trimmed deltas, division by the agreeing weights. PEFT
    ``merge_utils.ties`` = ``sign_source="unweighted", normalize="count"``
    (it elects on the unweighted trimmed deltas, divides by the agreeing count,
    and uses k = int(density * numel) without the floor of 1). mergekit's
    ``normalize=False`` = ``normalize="none"``; its ``consensus_method=count``
    = ``sign_method="frequency"``. With unit weights all agree.
    """
    stacked, w = _stack(deltas, weights)
    trimmed = torch.stack([magnitude(delta, density) for delta in stacked], dim=0)
    return elect_and_merge(trimmed, w, sign_method=sign_method, sign_source=sign_source, normalize=normalize)


@merge_method("dare_linear", DareOptions)
def dare_linear(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    density: float = DEFAULT_DENSITY,
    seed: int = 0,
    rescale: bool = True,
    generator: torch.Generator | None = None,
    masks: Sequence[Tensor] | None = None,
) -> Tensor:
    """DARE + linear: ``sum_i w_i * dare(tau_i)``.

    Each tau_i keeps entries with probability ``density`` (``generator``,
    consumed in delta order, or injected bool ``masks``) and kept entries are
    divided by ``density`` (``rescale``). Equal to PEFT ``dare_linear`` given
    the same masks (for float32 a generator seeded like the global RNG
    reproduces them). mergekit ``dare_linear`` rescales to the L1 norm instead
    of 1/density; with its ``rescale=False`` it equals ``rescale=False`` here.
    """
    stacked, w = _stack(deltas, weights)
    dropped = torch.stack(_dare_all(list(stacked), density, generator, masks, rescale, seed), dim=0)
    return (dropped * w).sum(dim=0)


@merge_method("dare_ties", DareTiesOptions)
def dare_ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    density: float = DEFAULT_DENSITY,
    seed: int = 0,
    rescale: bool = True,
    sign_method: SignMethod = "total",
    sign_source: SignSource = "weighted",
    normalize: Normalize = "weight",
    generator: torch.Generator | None = None,
    masks: Sequence[Tensor] | None = None,
) -> Tensor:
    """DARE sparsification (as :func:`dare_linear`) then TIES election + disjoint merge.

    PEFT ``dare_ties`` = ``sign_source="unweighted", normalize="count"`` with
    the same masks. mergekit ``dare_ties`` defaults to ``normalize=False``
    (``normalize="none"``) and an L1-norm rescale.
    """
    stacked, w = _stack(deltas, weights)
    dropped = torch.stack(_dare_all(list(stacked), density, generator, masks, rescale, seed), dim=0)
    return elect_and_merge(dropped, w, sign_method=sign_method, sign_source=sign_source, normalize=normalize)


@merge_method("breadcrumbs", BreadcrumbsOptions)
def breadcrumbs(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    density: float = DEFAULT_DENSITY,
    gamma: float = 0.01,
) -> Tensor:
    """Model Breadcrumbs: ``sum_i w_i * breadcrumbs(tau_i, density, gamma)``.

    Sparsifier: :func:`experts.sparsify.breadcrumbs` (mergekit
    ``magnitude_outliers``). Equal to mergekit ``breadcrumbs`` (its default
    ``normalize=False``, ``rescale=False``); gamma default 0.01 as mergekit.
    """
    stacked, w = _stack(deltas, weights)
    crumbs = torch.stack([breadcrumbs_sparsify(delta, density, gamma) for delta in stacked], dim=0)
    return (crumbs * w).sum(dim=0)


@merge_method("breadcrumbs_ties", BreadcrumbsTiesOptions)
def breadcrumbs_ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    density: float = DEFAULT_DENSITY,
    gamma: float = 0.01,
    sign_method: SignMethod = "total",
    sign_source: SignSource = "weighted",
    normalize: Normalize = "weight",
) -> Tensor:
    """Breadcrumbs sparsification then TIES election + disjoint merge.

    mergekit ``breadcrumbs_ties`` defaults to ``normalize=False``: pass
    ``normalize="none"`` to reproduce it.
    """
    stacked, w = _stack(deltas, weights)
    crumbs = torch.stack([breadcrumbs_sparsify(delta, density, gamma) for delta in stacked], dim=0)
    return elect_and_merge(crumbs, w, sign_method=sign_method, sign_source=sign_source, normalize=normalize)


# ----------------------------------------------------------------------------- PCB


def _minmax_rows(x: Tensor) -> Tensor:
    """Min-max normalise each row to [0, 1]; a constant row becomes all zeros."""
    low = x.min(dim=1, keepdim=True).values
    span = x.max(dim=1, keepdim=True).values - low
    return (x - low) / torch.where(span > 0, span, torch.ones_like(span))


def pcb_scores(flat: Tensor) -> Tensor:
    """PCB matrix beta [n, d] of flat task vectors ``flat`` [n, d] (paper eqs.).

    intra_i = Softmax(n * Norm(tau_i * tau_i)); inter_i = sum_j
    Softmax(Norm(tau_i * tau_j)) (j runs over all n, itself included);
    beta_i = intra_i * inter_i. Norm is min-max over the d entries of one row,
    Softmax runs over those d entries.
    """
    n = flat.shape[0]
    intra = torch.softmax(n * _minmax_rows(flat * flat), dim=1)
    inter = torch.zeros_like(flat)
    for j in range(n):
        inter += torch.softmax(_minmax_rows(flat * flat[j]), dim=1)
    return intra * inter


def _pcb_keep(scores: Tensor, ratio: float) -> Tensor:
    """Per row keep beta >= sorted_ascending(beta)[int((1 - ratio) * d)] (stable order)."""
    d = scores.shape[1]
    start = int((1.0 - ratio) * d)
    order = torch.sort(scores, dim=1, stable=True).indices
    keep = torch.zeros_like(scores, dtype=torch.bool)
    return keep.scatter_(1, order[:, start:], True)


@merge_method("pcb", PcbOptions)
def pcb(deltas: Sequence[Tensor], weights: Sequence[float], *, ratio: float = 0.1) -> Tensor:
    """PCB-Merging (Parameter Competition Balancing, Du et al., NeurIPS 2024).

    Per tensor, with tau_i flattened to d entries and n tasks:
      1. beta_i = Softmax(n * Norm(tau_i^2)) * sum_j Softmax(Norm(tau_i * tau_j))
         (intra- times inter-balancing; :func:`pcb_scores`);
      2. drop: keep beta_i >= sorted(beta_i)[int((1 - ratio) * d)], i.e. the
         top ``d - int((1 - ratio) * d)`` scores per task (ties by stable order);
         beta_hat_i = beta_i * keep_i;
      3. rescale: merged = sum_i w_i * beta_hat_i * tau_i / sum_i beta_hat_i
         (0 where no task keeps the entry). Unit weights give the paper's
         tau_m; the caller applies lambda.
    Scores are computed in float32 (float64 stays float64). ``ratio`` in (0, 1]
    is the kept fraction r (default 0.1, the official code's ``pcb_ratio``).
    The official script (duguodong7/pcb-merging) differs from the paper's
    equations, and so from this function: it flattens the whole model into one
    vector, first clips |tau| at its 1e-4 / 1 - 1e-4 quantiles, uses
    exp(n * Norm(|tau|)^2) for intra, tanh(tau_i * sum_j tau_j) for inter, and
    min-max rescales the kept scores so the weakest kept one gets weight 0.
    """
    stacked, w = _stack(deltas, weights)
    ratio = check_density(ratio, "ratio")
    work = stacked.reshape(stacked.shape[0], -1)
    work = work.float() if work.element_size() < 4 else work
    scores = pcb_scores(work)
    kept = scores * _pcb_keep(scores, ratio)
    total = kept.sum(dim=0)
    merged = (w.reshape(-1, 1).to(work.dtype) * kept * work).sum(dim=0)
    merged = merged / torch.where(total > 0, total, torch.ones_like(total))
    return merged.reshape(stacked.shape[1:]).to(stacked.dtype)
