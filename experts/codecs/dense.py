"""The ``dense`` codec: the whole tensor in ``value_dtype`` (the reference)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from deltaserve.experts.bitpack import (VALUE_DTYPES, PartMeta, Parts, add_flat_chunks, check_input,
                                        check_value_dtype, flat_target, meta_problems, require_parts)
from deltaserve.experts.codecs.base import CodecDefaults, codec


@codec("dense")
class DenseCodec(CodecDefaults):
    """The whole tensor in ``value_dtype`` (reference codec)."""

    part_names = ("values",)

    def encode(self, tensor: Tensor, *, value_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
        check_value_dtype(value_dtype)
        check_input(tensor, "dense")
        return {"values": tensor.to(value_dtype).contiguous()}

    def _values(self, parts: Parts, shape: Sequence[int]) -> Tensor:
        require_parts(parts, self.part_names, "dense")
        values = parts["values"]
        if tuple(values.shape) != tuple(shape):
            raise ValueError(f"part 'values' has shape {list(values.shape)}, expected {list(shape)}")
        return values

    def decode(self, parts: Parts, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        return self._values(parts, shape).to(dtype)

    @torch.no_grad()
    def add_into(self, target: Tensor, parts: Parts, weight: float) -> None:
        flat = flat_target(target)
        add_flat_chunks(flat, self._values(parts, tuple(target.shape)).reshape(-1), weight)

    def check_parts(self, part_meta: PartMeta, shape: Sequence[int]) -> list[str]:
        problems = meta_problems(part_meta, self.part_names)
        if problems:
            return problems
        values_shape, values_dtype = part_meta["values"]
        if values_shape != tuple(shape) or values_dtype not in VALUE_DTYPES:
            problems.append(f"part 'values' is {values_dtype} {list(values_shape)}, expected {list(shape)} "
                            f"of {VALUE_DTYPES}")
        return problems
