"""The exact LoRA merge: a weighted sum of LoRAs is one LoRA of the summed rank.

``sum_i w_i * s_i * B_i @ A_i == B_cat @ A_cat`` with the A's (scaled) stacked
and the B's concatenated; PEFT's ``add_weighted_adapter(combination_type="cat")``
is the reference. The serving engine's LoRA path builds its merged adapters
with it (server/adapters.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from deltaserve.experts.merge.inputs import check_numbers
from deltaserve.experts.sparsify import check_tensor

__all__ = ["lora_concat"]


def lora_concat(
    loras: Sequence[tuple[Tensor, Tensor]],
    weights: Sequence[float],
    scalings: Sequence[float],
) -> tuple[Tensor, Tensor]:
    """Exact weighted LoRA merge: ``sum_i w_i * s_i * B_i @ A_i == B_cat @ A_cat``.

    ``loras[i] = (A_i, B_i)`` with A_i [r_i, in], B_i [out, r_i]; ``scalings``
    are the adapters' s_i = lora_alpha / r (pass them explicitly: forgetting
    them is the classic bug). Returns ``(A_cat, B_cat)`` of rank sum r_i: the
    A's scaled by w_i * s_i stacked along the rank dim, the B's concatenated
    unscaled (PEFT ``add_weighted_adapter(combination_type="cat")``, whose new
    adapter has scaling 1).
    """
    if not isinstance(loras, Sequence) or not loras:
        raise ValueError(f"loras must be a non-empty sequence of (A, B) pairs, got {type(loras).__name__}")
    checked_weights = check_numbers(weights, "weights", len(loras))
    checked_scalings = check_numbers(scalings, "scalings", len(loras))
    _check_lora_pairs(loras)
    # (A * w) * s in PEFT's operation order, so the factors match it bit for bit.
    a_cat = torch.cat([a * w * s for (a, _), w, s in zip(loras, checked_weights, checked_scalings)], dim=0)
    b_cat = torch.cat([b for _, b in loras], dim=1)
    return a_cat, b_cat


def _check_lora_pairs(loras: Sequence[tuple[Tensor, Tensor]]) -> None:
    """Every pair is A [r_i, in], B [out, r_i] with one in, out and dtype."""
    a0, b0 = loras[0]
    for i, (a, b) in enumerate(loras):
        check_tensor(a, f"loras[{i}][0] (A)")
        check_tensor(b, f"loras[{i}][1] (B)")
        shapes = f"A {tuple(a.shape)}, B {tuple(b.shape)}"
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"loras[{i}] must be A [r, in], B [out, r], got {shapes}")
        if (a.shape[1], b.shape[0], a.dtype, b.dtype) != (a0.shape[1], b0.shape[0], a0.dtype, a0.dtype):
            expected = f"{a0.dtype} with in={a0.shape[1]}, out={b0.shape[0]}"
            raise ValueError(f"loras[{i}] is {a.dtype}/{b.dtype} {shapes}; expected {expected}")
