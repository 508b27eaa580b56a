"""PCB-Merging: parameter competition balancing (Du et al., NeurIPS 2024)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from deltaserve.experts.merge.inputs import stacked
from deltaserve.experts.merge.registry import merge_method
from deltaserve.experts.options import Ratio
from deltaserve.experts.sparsify import check_density


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


@merge_method("pcb")
def pcb(deltas: Sequence[Tensor], weights: Sequence[float], *, ratio: Ratio = 0.1) -> Tensor:
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
    stack, w = stacked(deltas, weights)
    ratio = check_density(ratio, "ratio")
    work = stack.reshape(stack.shape[0], -1)
    work = work.float() if work.element_size() < 4 else work
    scores = pcb_scores(work)
    kept = scores * _pcb_keep(scores, ratio)
    total = kept.sum(dim=0)
    merged = (w.reshape(-1, 1).to(work.dtype) * kept * work).sum(dim=0)
    merged = merged / torch.where(total > 0, total, torch.ones_like(total))
    return merged.reshape(stack.shape[1:]).to(stack.dtype)
