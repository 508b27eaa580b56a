"""Sparsifiers of task vectors (tau = theta_ft - theta_base): which entries to keep; pure tensor -> tensor.

Sign-valued compressors (T-Switch, BitDelta) are in experts.signs, the low-rank factorisation in
experts.lowrank; they share this module's checks and conventions.

No I/O, no config. Every function validates its arguments and raises
``ValueError`` naming the parameter and the bad value.

Shared conventions
------------------
* **Per tensor.** Every function except :func:`magnitude_global` ranks the
  entries of one tensor on its own (flattened, row-major).
* **Ranking and ties.** Entries are ordered by ``|x|`` with a *stable*
  ascending sort, so at equal magnitude the entry with the larger flat index
  ranks higher. mergekit (``argsort``) and PEFT (``topk``) leave ties
  unspecified; on tensors without tied magnitudes all three agree exactly.
  Magnitudes of half-precision inputs are ranked in float32 (mergekit ranks
  everything in float32 on CPU; we keep float64 in float64).
* **Randomness** only through an explicit ``torch.Generator``; the global RNG
  is never touched.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = [
    "breadcrumbs", "breadcrumbs_mask", "check_density", "check_tensor", "dare", "dare_mask", "magnitude",
    "magnitude_global", "magnitude_mask", "ties_trim", "top_count",
]  # fmt: skip


# --------------------------------------------------------------------------- checks


def check_density(density: float, name: str = "density") -> float:
    """Return ``density`` as a float if it lies in (0, 1], else raise ValueError."""
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise ValueError(f"{name} must be a number in (0, 1], got {density!r}")
    if not (0.0 < float(density) <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {density!r}")
    return float(density)


def _check_fraction(value: float, name: str) -> float:
    """Return ``value`` as a float if it lies in [0, 1), else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    if not (0.0 <= float(value) < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def check_tensor(tensor: Tensor, name: str = "tensor") -> Tensor:
    """Reject non-tensors, non-floating dtypes and NaN/Inf entries."""
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {tensor.dtype}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or Inf entries")
    return tensor


def _rank_key(tensor: Tensor) -> Tensor:
    """Flat ``|x|`` in at least float32 (the dtype entries are ranked in)."""
    flat = tensor.detach().abs().reshape(-1)
    return flat.float() if flat.element_size() < 4 else flat


def _ascending_order(key: Tensor) -> Tensor:
    """Flat indices sorted by ``key`` ascending; ties: larger index ranks higher."""
    return torch.sort(key, stable=True).indices


def top_count(numel: int, density: float) -> int:
    """Entries kept by magnitude top-k: ``max(1, int(density * numel))``.

    ``int`` truncates the float product, exactly as mergekit's ``magnitude``
    (so 0.29 * 100 keeps 28). PEFT's ``magnitude_based_pruning`` uses
    ``int(density * numel)`` without the ``max(1, .)`` floor.
    """
    if numel == 0:
        return 0
    return max(1, int(check_density(density) * numel))


# ------------------------------------------------------------------ magnitude top-k


def _top_mask_flat(key: Tensor, k: int) -> Tensor:
    """Flat bool mask of the ``k`` largest entries of ``key``; ties go to the larger index.

    Equal to marking the last ``k`` of a stable ascending sort, in O(n): the k-th
    largest value is found with ``kthvalue``; everything above it is kept, and of
    the entries equal to it, the ``k - above`` with the largest indices (what the
    stable sort would rank last). No sort: fine-tuning deltas have many equal
    values, and resolving a tie at the cut with a full sort would dominate an NPS
    search on SmolLM2-135M (135 M entries per candidate).
    """
    n = key.numel()
    if k <= 0 or k >= n:
        return torch.full((n,), k > 0, dtype=torch.bool, device=key.device)
    threshold = torch.kthvalue(key, n - k + 1).values
    mask = key > threshold
    missing = k - int(mask.count_nonzero())
    if missing > 0:
        tied = (key == threshold).nonzero().squeeze(1)
        mask[tied[tied.numel() - missing:]] = True
    return mask


def magnitude_mask(tensor: Tensor, density: float) -> Tensor:
    """Bool mask of the ``top_count(numel, density)`` largest-``|x|`` entries."""
    check_tensor(tensor)
    k = top_count(tensor.numel(), density)
    return _top_mask_flat(_rank_key(tensor), k).reshape(tensor.shape)


def magnitude(tensor: Tensor, density: float) -> Tensor:
    """Keep the top-k entries by ``|x|`` per tensor, zero the rest.

    k = ``max(1, int(density * numel))`` (see :func:`top_count`); equal to
    mergekit ``sparsify.magnitude(tensor, density)`` (no rescale). Returns a new
    tensor of the same dtype even when ``density == 1``.
    """
    return tensor * magnitude_mask(tensor, density).to(tensor.dtype)


def ties_trim(tensor: Tensor, density: float) -> Tensor:
    """TIES "trim" step: exactly :func:`magnitude` (per-tensor top-k)."""
    return magnitude(tensor, density)


def magnitude_global(tensors: Mapping[str, Tensor], density: float) -> dict[str, Tensor]:
    """Top-k by ``|x|`` over all entries of all tensors (one global threshold).

    k = ``max(1, int(density * total_numel))``. Ranking runs over the
    concatenation of the flattened tensors in mapping order (float64 if any
    input is float64, else float32); ties go to the later position.
    """
    if not isinstance(tensors, Mapping) or not tensors:
        raise ValueError(f"tensors must be a non-empty mapping, got {tensors!r}")
    for name, tensor in tensors.items():
        check_tensor(tensor, name=f"tensors[{name!r}]")
    any_double = any(t.dtype == torch.float64 for t in tensors.values())
    key_dtype = torch.float64 if any_double else torch.float32
    keys = torch.cat([t.detach().abs().reshape(-1).to(key_dtype) for t in tensors.values()])
    flat_mask = _top_mask_flat(keys, top_count(keys.numel(), density))
    out: dict[str, Tensor] = {}
    start = 0
    for name, tensor in tensors.items():
        part = flat_mask[start : start + tensor.numel()].reshape(tensor.shape)
        out[name] = tensor * part.to(device=tensor.device, dtype=tensor.dtype)
        start += tensor.numel()
    return out


# ---------------------------------------------------------------------------- DARE


def dare_mask(
    shape: torch.Size, density: float, generator: torch.Generator, device: torch.device | str = "cpu"
) -> Tensor:
    """Bernoulli(``density``) keep-mask drawn from ``generator``.

    Probabilities are always drawn in float32, so one seed gives the same mask
    for float32/float64/bf16 tensors; this equals mergekit's CPU ``bernoulli``
    and PEFT's ``random_pruning`` for float32 tensors when the global RNG is
    seeded like ``generator`` (PEFT draws float64 tensors in float64, whose
    stream differs; inject its mask through ``dare(..., mask=)`` instead).
    """
    check_density(density)
    probabilities = torch.full(tuple(shape), density, dtype=torch.float32, device=device)
    return torch.bernoulli(probabilities, generator=generator).bool()


def dare(
    tensor: Tensor,
    density: float,
    generator: torch.Generator | None = None,
    *,
    rescale: bool = True,
    mask: Tensor | None = None,
) -> Tensor:
    """DARE: keep each entry with probability ``density``, rescale kept by 1/density.

    Give exactly one of ``generator`` (mask drawn by :func:`dare_mask`) or
    ``mask`` (a bool keep-mask of ``tensor``'s shape, e.g. PEFT's). With
    ``density == 1`` and no mask, a copy is returned and the generator is not
    consumed (as in PEFT and mergekit). The result is ``tensor * mask /
    density`` in that operation order (bit-identical to PEFT's); with
    ``rescale=False`` it is ``tensor * mask`` (mergekit's ``bernoulli``
    without its L1 ``rescale_norm``).
    """
    check_tensor(tensor)
    density = check_density(density)
    if generator is not None and mask is not None:
        raise ValueError("give only one of generator or mask, got both")
    if mask is None:
        if density == 1.0:
            return tensor.clone()
        if generator is None:
            raise ValueError(f"generator is required when density < 1 and mask is None, got {generator!r}")
        mask = dare_mask(tensor.shape, density, generator, device=tensor.device)
    elif mask.dtype != torch.bool or mask.shape != tensor.shape:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(tensor.shape)}, got {mask.dtype} {tuple(mask.shape)}"
        )
    kept = tensor * mask.to(tensor.dtype)
    return kept / density if rescale else kept


# ---------------------------------------------------------------------- breadcrumbs


def breadcrumbs_mask(tensor: Tensor, density: float, gamma: float) -> Tensor:
    """Keep-mask of Model Breadcrumbs (mergekit ``magnitude_outliers`` convention).

    With n = numel: keep_n = ``int(density * n)`` (no ``max(1, .)`` floor, so a
    tiny density can keep nothing), top_n = ``int(gamma * n)``, bottom_n =
    ``max(0, n - keep_n - top_n)``. In ascending ``|x|`` order, entries
    ``[bottom_n, bottom_n + keep_n)`` are kept: the smallest bottom_n are
    dropped and the largest outliers fill whatever is left (the outlier drop
    shrinks when density + gamma > 1).
    """
    check_tensor(tensor)
    density = check_density(density)
    gamma = _check_fraction(gamma, "gamma")
    n = tensor.numel()
    keep_n = int(density * n)
    bottom_n = max(0, n - keep_n - int(gamma * n))
    order = _ascending_order(_rank_key(tensor))
    mask = torch.zeros(n, dtype=torch.bool, device=tensor.device)
    mask[order[bottom_n : bottom_n + keep_n]] = True
    return mask.reshape(tensor.shape)


def breadcrumbs(tensor: Tensor, density: float, gamma: float) -> Tensor:
    """Drop the top-``gamma`` outliers and the small tail; keep ``density`` of entries.

    Equal to mergekit ``sparsify.magnitude_outliers(tensor, density, gamma=gamma)``
    (no rescale); see :func:`breadcrumbs_mask` for the exact counts.
    """
    return tensor * breadcrumbs_mask(tensor, density, gamma).to(tensor.dtype)
