"""DARE (Yu et al., 2024): drop entries at random, rescale the kept ones; then add (``dare_linear``)
or elect signs as TIES does (``dare_ties``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from deltaserve.experts.merge.inputs import stacked
from deltaserve.experts.merge.methods.ties import DEFAULT_DENSITY, elect_and_merge
from deltaserve.experts.merge.registry import merge_method
from deltaserve.experts.options import Density, Normalize, Rescale, Seed, SignMethod, SignSource
from deltaserve.experts.sparsify import check_density, dare


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


@merge_method("dare_linear", runtime=("generator", "masks"))
def dare_linear(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    density: Density = DEFAULT_DENSITY,
    seed: Seed = 0,
    rescale: Rescale = True,
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
    stack, w = stacked(deltas, weights)
    dropped = torch.stack(_dare_all(list(stack), density, generator, masks, rescale, seed), dim=0)
    return (dropped * w).sum(dim=0)


@merge_method("dare_ties", runtime=("generator", "masks"))
def dare_ties(
    deltas: Sequence[Tensor],
    weights: Sequence[float],
    *,
    density: Density = DEFAULT_DENSITY,
    seed: Seed = 0,
    rescale: Rescale = True,
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
    stack, w = stacked(deltas, weights)
    dropped = torch.stack(_dare_all(list(stack), density, generator, masks, rescale, seed), dim=0)
    return elect_and_merge(dropped, w, sign_method=sign_method, sign_source=sign_source, normalize=normalize)
