"""Low-rank factorisation of a task-vector matrix (truncated SVD, LoRA convention); conventions and
checks as experts.sparsify."""

from __future__ import annotations

import torch
from torch import Tensor

from deltaserve.experts.sparsify import check_density, check_tensor


def _energy_rank(singular_values: Tensor, energy: float) -> int:
    """Smallest r with sum(S[:r]^2) >= energy * sum(S^2) (at least 1)."""
    cumulative = torch.cumsum(singular_values.double() ** 2, dim=0)
    if float(cumulative[-1]) == 0.0:
        return 1
    short = int((cumulative < energy * cumulative[-1]).sum())
    return min(short + 1, singular_values.numel())


def lowrank(matrix: Tensor, rank: int | None = None, energy: float | None = None) -> tuple[Tensor, Tensor]:
    """Truncated SVD in the LoRA convention: returns ``(A, B)`` with B @ A ~ matrix.

    ``B`` is [out, r] = U_r * sqrt(S_r), ``A`` is [r, in] = sqrt(S_r) * Vh_r
    (singular values split symmetrically). ``B @ A`` is the best rank-r
    approximation (Eckart-Young): its Frobenius error is
    ``sqrt(sum of dropped S^2)``. Give exactly one of ``rank`` (1 <= rank <=
    min(out, in)) or ``energy`` in (0, 1]: the smallest r whose kept squared
    singular values reach that fraction of the total. The SVD runs in float32
    for half inputs; the factors come back in ``matrix``'s dtype.
    """
    check_tensor(matrix, name="matrix")
    if matrix.dim() != 2:
        raise ValueError(f"matrix must be 2-D, got shape {tuple(matrix.shape)}")
    if (rank is None) == (energy is None):
        raise ValueError(f"give exactly one of rank or energy, got rank={rank!r}, energy={energy!r}")
    if energy is not None:
        energy = check_density(energy, "energy")
    max_rank = min(matrix.shape)
    valid_rank = isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= max_rank
    if rank is not None and not valid_rank:
        raise ValueError(f"rank must be an int in [1, {max_rank}], got {rank!r}")
    work = matrix.float() if matrix.element_size() < 4 else matrix
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    r = rank if rank is not None else _energy_rank(s, float(energy))  # type: ignore[arg-type]
    root = torch.sqrt(s[:r])
    b = u[:, :r] * root
    a = root[:, None] * vh[:r]
    return a.to(matrix.dtype), b.to(matrix.dtype)
