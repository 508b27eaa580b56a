"""Sign-valued compressors of task vectors: T-Switch's ternary ``scale * sign`` on the top entries,
BitDelta's ``scale * sign(tau)`` per changed row, and ``sign * mean |kept|`` on any sparse support. Pure
tensor -> tensor, conventions as experts.sparsify."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from deltaserve.experts.sparsify import magnitude_mask


@dataclass(frozen=True)
class TernaryTensor:
    """T-Switch ternary task vector: ``scale * sign`` on ``mask``, 0 elsewhere.

    ``mask``: bool, the kept entries. ``sign``: int8, +1/-1 on kept entries and
    0 elsewhere. ``scale``: one float per tensor, >= 0.
    """

    mask: Tensor
    sign: Tensor
    scale: float

    def __post_init__(self) -> None:
        if self.mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool, got {self.mask.dtype}")
        if self.sign.dtype != torch.int8 or self.sign.shape != self.mask.shape:
            raise ValueError(
                f"sign must be int8 of shape {tuple(self.mask.shape)}, "
                f"got {self.sign.dtype} {tuple(self.sign.shape)}"
            )
        if not bool((self.sign.abs() == self.mask.to(torch.int8)).all()):
            raise ValueError("sign must be +1/-1 where mask is set and 0 elsewhere")
        if not (math.isfinite(self.scale) and self.scale >= 0.0):
            raise ValueError(f"scale must be finite and >= 0, got {self.scale!r}")

    @property
    def kept_count(self) -> int:
        return int(self.mask.sum())


def ternary(tensor: Tensor, density: float) -> TernaryTensor:
    """T-Switch: keep the top-``density`` entries by ``|x|`` as sign * one scale.

    Kept = :func:`magnitude_mask` minus exact zeros (a zero has no sign), so
    ``kept_count <= top_count``. ``scale = ||tau_kept||_2 / ||sign_kept||_2 =
    ||tau_kept||_2 / sqrt(kept_count)`` (0 when nothing is kept), computed in
    float64; the reconstruction therefore has the L2 norm of ``tau_kept``.
    """
    mask = magnitude_mask(tensor, density) & (tensor != 0)
    kept_count = int(mask.sum())
    kept_norm = float(torch.linalg.vector_norm(tensor[mask].double())) if kept_count else 0.0
    scale = kept_norm / math.sqrt(kept_count) if kept_count else 0.0
    sign = torch.sign(tensor).to(torch.int8) * mask.to(torch.int8)
    return TernaryTensor(mask=mask, sign=sign, scale=scale)


def ternary_dense(t: TernaryTensor, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Reconstruct ``scale * sign * mask`` as a dense tensor of ``dtype``."""
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    return t.sign.to(dtype) * t.scale


def bitdelta(tensor: Tensor) -> Tensor:
    """BitDelta (Liu et al., 2024): ``scale * sign(tau)`` with ``scale = mean |tau|``, the scale that
    minimises the squared error for fixed signs. Rows (first dimension) that are all zero stay zero
    (e.g. embedding rows a fine-tune never touched); in the other rows a zero entry gets ``+scale``."""
    if tensor.dim() == 0:
        return tensor.clone()
    grid = tensor.reshape(tensor.shape[0] if tensor.dim() > 1 else 1, -1)
    kept = (grid != 0).any(dim=1)
    if not bool(kept.any()):
        return torch.zeros_like(tensor)
    scale = grid[kept].abs().double().mean().to(tensor.dtype)
    signs = torch.where(grid < 0, -1.0, 1.0).to(tensor.dtype)
    return (signs * scale * kept.unsqueeze(1).to(tensor.dtype)).reshape(tensor.shape)


def sign_valued(tensor: Tensor) -> Tensor:
    """A sparse tensor's kept (non-zero) entries as ``sign * scale`` with ``scale = mean |kept|`` (computed in
    float64), the squared-error-optimal scale for fixed signs and support; zeros stay zero."""
    kept = tensor != 0
    if not bool(kept.any()):
        return tensor.clone()
    scale = tensor[kept].abs().double().mean().to(tensor.dtype)
    return torch.sign(tensor) * scale


def with_values(deltas: dict[str, Tensor], values: str) -> dict[str, Tensor]:
    """A sparse support's kept values as they will be stored: as they are (``exact``) or ``sign_valued``
    per tensor (``sign``)."""
    return {name: sign_valued(t) for name, t in deltas.items()} if values == "sign" else deltas
