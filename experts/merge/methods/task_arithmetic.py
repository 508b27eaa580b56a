"""Task arithmetic: the weighted sum of the task vectors."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from deltaserve.experts.merge.inputs import stacked
from deltaserve.experts.merge.registry import merge_method


@merge_method("task_arithmetic")
def task_arithmetic(deltas: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Task arithmetic: ``sum_i w_i * tau_i`` (= mergekit ``task_arithmetic``, PEFT ``task_arithmetic``)."""
    stack, w = stacked(deltas, weights)
    return (stack * w).sum(dim=0)
