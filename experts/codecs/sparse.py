"""The ``sparse`` codec: a packed 1-bit mask of the kept entries and their values."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from deltaserve.experts.bitpack import (VALUE_DTYPES, PartMeta, Parts, add_entries, check_input, check_value_dtype,
                                        flat_target, mask_problems, meta_problems, pack_bits, require_parts,
                                        unpack_bits)
from deltaserve.experts.codecs.base import CodecDefaults, codec


@codec("sparse")
class SparseCodec(CodecDefaults):
    """Packed 1-bit mask + the non-zero values (row-major) in ``value_dtype``."""

    part_names = ("mask", "values")
    sparse_entries = True

    def encode(self, tensor: Tensor, *, value_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
        check_value_dtype(value_dtype)
        check_input(tensor, "sparse")
        mask = tensor.reshape(-1) != 0
        return {"mask": pack_bits(mask), "values": tensor.reshape(-1)[mask].to(value_dtype).contiguous()}

    def _mask(self, parts: Parts, numel: int) -> Tensor:
        require_parts(parts, self.part_names, "sparse")
        mask = unpack_bits(parts["mask"], numel)
        kept = int(torch.count_nonzero(mask))
        if not parts["values"].is_floating_point():
            raise ValueError(f"part 'values' must be floating, got {parts['values'].dtype}")
        if parts["values"].dim() != 1 or parts["values"].numel() != kept:
            raise ValueError(f"part 'values' has shape {list(parts['values'].shape)} but the mask keeps {kept} entries")
        return mask

    def decode(self, parts: Parts, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        mask = self._mask(parts, math.prod(shape))
        out = torch.zeros(mask.numel(), dtype=dtype, device=mask.device)
        out[mask] = parts["values"].to(dtype)
        return out.view(tuple(shape))

    @torch.no_grad()
    def add_into(self, target: Tensor, parts: Parts, weight: float) -> None:
        flat = flat_target(target)
        add_entries(flat, *self.entries(parts, flat.numel()), weight)

    def entries(self, parts: Parts, numel: int) -> tuple[Tensor, Tensor]:
        """``(flat indices int64, values as stored)`` of the kept entries: what ``add_into`` adds."""
        require_parts(parts, self.part_names, "sparse")
        values = parts["values"]
        # One pass over the mask (nonzero) instead of _mask's extra count: this is the dense path's hot loop.
        index = unpack_bits(parts["mask"], numel).nonzero().squeeze(1)
        if not values.is_floating_point() or values.dim() != 1 or values.numel() != index.numel():
            raise ValueError(f"part 'values' is {values.dtype} {list(values.shape)} but the mask keeps "
                             f"{index.numel()} entries")
        return index, values

    def check_parts(self, part_meta: PartMeta, shape: Sequence[int]) -> list[str]:
        problems = meta_problems(part_meta, self.part_names)
        if problems:
            return problems
        problems = mask_problems(part_meta, math.prod(shape))
        values_shape, values_dtype = part_meta["values"]
        if len(values_shape) != 1 or values_dtype not in VALUE_DTYPES:
            problems.append(f"part 'values' is {values_dtype} {list(values_shape)}, expected 1-D of {VALUE_DTYPES}")
        elif values_shape[0] > math.prod(shape):
            problems.append(f"part 'values' holds {values_shape[0]} entries for {math.prod(shape)} parameters")
        return problems

    def kept_count(self, parts: Parts) -> int | None:
        return parts["values"].numel()
