"""Model Breadcrumbs (Davari & Belilovsky, 2024): a magnitude band without the largest outliers,
added (``breadcrumbs``) or TIES-elected (``breadcrumbs_ties``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from deltaserve.experts.merge.inputs import stacked
from deltaserve.experts.merge.methods.ties import DEFAULT_DENSITY, elect_and_merge
from deltaserve.experts.merge.registry import merge_method
from deltaserve.experts.options import Density, Gamma, Normalize, SignMethod, SignSource
from deltaserve.experts.sparsify import breadcrumbs as breadcrumbs_sparsify


@merge_method("breadcrumbs")
def breadcrumbs(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    density: Density = DEFAULT_DENSITY,
    gamma: Gamma = 0.01,
) -> Tensor:
    """Model Breadcrumbs: ``sum_i w_i * breadcrumbs(tau_i, density, gamma)``.

    Sparsifier: :func:`experts.sparsify.breadcrumbs` (mergekit
    ``magnitude_outliers``). Equal to mergekit ``breadcrumbs`` (its default
    ``normalize=False``, ``rescale=False``); gamma default 0.01 as mergekit.
    """
    stack, w = stacked(deltas, weights)
    crumbs = torch.stack([breadcrumbs_sparsify(delta, density, gamma) for delta in stack], dim=0)
    return (crumbs * w).sum(dim=0)


@merge_method("breadcrumbs_ties")
def breadcrumbs_ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    density: Density = DEFAULT_DENSITY,
    gamma: Gamma = 0.01,
    sign_method: SignMethod = "total",
    sign_source: SignSource = "weighted",
    normalize: Normalize = "weight",
) -> Tensor:
    """Breadcrumbs sparsification then TIES election + disjoint merge.

    mergekit ``breadcrumbs_ties`` defaults to ``normalize=False``: pass
    ``normalize="none"`` to reproduce it.
    """
    stack, w = stacked(deltas, weights)
    crumbs = torch.stack([breadcrumbs_sparsify(delta, density, gamma) for delta in stack], dim=0)
    return elect_and_merge(crumbs, w, sign_method=sign_method, sign_source=sign_source, normalize=normalize)
