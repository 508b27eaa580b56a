"""TIES-merging: trim each task vector, elect a sign per entry, average the agreeing entries
(Yadav et al., NeurIPS 2023). ``elect_and_merge`` is the election and disjoint merge that the
DARE and Breadcrumbs variants reuse."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from deltaserve.experts.merge.inputs import check_choice, stacked
from deltaserve.experts.merge.registry import merge_method
from deltaserve.experts.options import Density, Normalize, SignMethod, SignSource
from deltaserve.experts.sparsify import magnitude

#: Default kept fraction for the sparsifying methods (TIES paper: top-20 %).
DEFAULT_DENSITY = 0.2


def elect_and_merge(
    sparse: Tensor,
    weights: Tensor,
    *,
    sign_method: SignMethod = "total",
    sign_source: SignSource = "weighted",
    normalize: Normalize = "weight",
) -> Tensor:
    """TIES sign election + disjoint merge of stack (already sparsified) deltas.

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
    check_choice(sign_method, "sign_method", ("total", "frequency"))
    check_choice(sign_source, "sign_source", ("weighted", "unweighted"))
    check_choice(normalize, "normalize", ("weight", "count", "none"))
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


@merge_method("ties")
def ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    density: Density = DEFAULT_DENSITY,
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
    stack, w = stacked(deltas, weights)
    trimmed = torch.stack([magnitude(delta, density) for delta in stack], dim=0)
    return elect_and_merge(trimmed, w, sign_method=sign_method, sign_source=sign_source, normalize=normalize)
