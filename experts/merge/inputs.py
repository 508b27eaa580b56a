"""Input checks every merge method shares: same-shape finite deltas, one finite weight per delta."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from deltaserve.experts.sparsify import check_tensor


def stacked(deltas: Sequence[Tensor], weights: Sequence[float]) -> tuple[Tensor, Tensor]:
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
    stack = torch.stack(list(deltas), dim=0)
    w = torch.tensor(values, dtype=first.dtype, device=first.device)
    return stack, w.reshape((-1,) + (1,) * first.dim())


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


def check_choice(value: object, name: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
