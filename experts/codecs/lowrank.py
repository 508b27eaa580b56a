"""The ``lowrank`` codec: factors A [r, in] and B [out, r] with delta = B @ A (LoRA convention)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from deltaserve.experts.bitpack import (CHUNK_ENTRIES, VALUE_DTYPES, PartMeta, Parts, check_input, check_value_dtype,
                                        compute_dtype, flat_target, meta_problems, require_parts)
from deltaserve.experts.codecs.base import CodecDefaults, codec
from deltaserve.experts.lowrank import lowrank as svd_factors


@codec("lowrank")
class LowRankCodec(CodecDefaults):
    """Factors ``A`` [r, in] and ``B`` [out, r] with delta = B @ A (LoRA convention).

    Any LoRA scaling (alpha / r) must be folded into ``B`` by the caller.
    ``encode`` on a dense tensor needs ``rank=`` and does a truncated SVD
    (sqrt of the singular values goes to each factor); LoRA experts should use
    ``encode_factors(A, B)`` so nothing is recomputed.
    """

    part_names = ("A", "B")
    lowrank = True

    def encode_factors(self, A: Tensor, B: Tensor, *, value_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
        check_value_dtype(value_dtype)
        check_input(A, "lowrank")
        check_input(B, "lowrank")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] < 1:
            raise ValueError(f"lowrank factors must be A [r, in], B [out, r] with r >= 1; "
                             f"got A {list(A.shape)}, B {list(B.shape)}")
        return {"A": A.to(value_dtype).contiguous(), "B": B.to(value_dtype).contiguous()}

    def encode(self, tensor: Tensor, *, value_dtype: torch.dtype = torch.float16,
               rank: int | None = None) -> dict[str, Tensor]:
        if rank is None:
            raise ValueError("lowrank codec cannot store a dense tensor as is: pass rank=<int> for a truncated "
                             "SVD, or use encode_factors(A, B) with the factors of a low-rank compressor/LoRA")
        check_input(tensor, "lowrank")
        if tensor.dim() != 2 or not 1 <= rank <= min(tensor.shape):
            raise ValueError(f"rank must be in [1, {min(tensor.shape) if tensor.dim() == 2 else '?'}] "
                             f"for a 2-D tensor; got rank={rank} for shape {list(tensor.shape)}")
        A, B = svd_factors(tensor.to(compute_dtype(tensor.dtype)), rank=rank)
        return self.encode_factors(A, B, value_dtype=value_dtype)

    def _factors(self, parts: Parts, shape: Sequence[int], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        require_parts(parts, self.part_names, "lowrank")
        problems = self.check_parts({k: (tuple(v.shape), v.dtype) for k, v in parts.items()}, shape)
        if problems:
            raise ValueError("; ".join(problems))
        return parts["A"].to(dtype), parts["B"].to(dtype)

    def factors(self, parts: Parts, shape: Sequence[int], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(A [r, in], B [out, r])`` in ``dtype``, checked against the parameter's ``shape``."""
        return self._factors(parts, shape, dtype)

    def decode(self, parts: Parts, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        A, B = self._factors(parts, shape, compute_dtype(dtype))
        return (B @ A).to(dtype)

    @torch.no_grad()
    def add_into(self, target: Tensor, parts: Parts, weight: float) -> None:
        flat_target(target)
        compute = compute_dtype(target.dtype)
        A, B = self._factors(parts, tuple(target.shape), compute)
        rows_per_chunk = max(1, CHUNK_ENTRIES // max(1, target.shape[1]))
        for start in range(0, target.shape[0], rows_per_chunk):
            block = target[start:start + rows_per_chunk]
            block.copy_(block.to(compute) + weight * (B[start:start + rows_per_chunk] @ A))

    def check_parts(self, part_meta: PartMeta, shape: Sequence[int]) -> list[str]:
        problems = meta_problems(part_meta, self.part_names)
        if problems:
            return problems
        (a_shape, a_dtype), (b_shape, b_dtype) = part_meta["A"], part_meta["B"]
        if len(shape) != 2:
            return [f"lowrank needs a 2-D parameter, manifest shape is {list(shape)}"]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1] or a_shape[0] < 1 \
                or (b_shape[0], a_shape[1]) != tuple(shape):
            problems.append(f"factors A {list(a_shape)}, B {list(b_shape)} do not give B @ A of shape {list(shape)}")
        if a_dtype not in VALUE_DTYPES or b_dtype not in VALUE_DTYPES:
            problems.append(f"factor dtypes {a_dtype}, {b_dtype} not in {VALUE_DTYPES}")
        return problems

    def rank(self, parts: Parts) -> int | None:
        return int(parts["A"].shape[0])
