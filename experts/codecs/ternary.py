"""The ``ternary`` codec: mask, one sign bit per kept entry and one float32 scale (T-Switch)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from deltaserve.experts.bitpack import (PartMeta, Parts, add_at_indices, check_input, check_value_dtype,
                                        compute_dtype, flat_target, mask_problems, meta_problems, pack_bits,
                                        require_parts, unpack_bits)
from deltaserve.experts.codecs.base import CodecDefaults, codec


@codec("ternary")
class TernaryCodec(CodecDefaults):
    """Packed mask + packed sign bits of the kept entries (1 = negative) + one float32 scale.

    ``value_dtype`` is accepted for a uniform signature and ignored: the scale
    is always float32, so ternary float16/bfloat16/float32 input round-trips
    exactly (a float64 magnitude is rounded to float32).
    """

    part_names = ("mask", "sign", "scale")

    def encode(self, tensor: Tensor, *, value_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
        check_value_dtype(value_dtype)
        check_input(tensor, "ternary")
        flat = tensor.reshape(-1)
        mask = flat != 0
        kept = flat[mask]
        magnitudes = kept.abs().unique()
        if magnitudes.numel() > 1:
            raise ValueError(
                f"ternary codec needs values in {{-a, 0, +a}}; got {magnitudes.numel()} distinct magnitudes "
                f"(e.g. {magnitudes[:3].tolist()}); compress with a ternary compressor first"
            )
        scale = magnitudes.to(torch.float32) if magnitudes.numel() else torch.zeros(1)
        return {"mask": pack_bits(mask), "sign": pack_bits(kept < 0), "scale": scale.reshape(1)}

    def _mask_and_signs(self, parts: Parts, numel: int) -> tuple[Tensor, Tensor, float]:
        require_parts(parts, self.part_names, "ternary")
        mask = unpack_bits(parts["mask"], numel)
        negative = unpack_bits(parts["sign"], int(torch.count_nonzero(mask)), part="sign")
        scale = parts["scale"]
        if scale.dtype != torch.float32 or scale.shape != (1,):
            raise ValueError(f"part 'scale' must be float32 [1], got {scale.dtype} {list(scale.shape)}")
        return mask, negative, float(scale.item())

    @staticmethod
    def _kept_values(negative: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
        kept = torch.full(negative.shape, scale, dtype=dtype, device=negative.device)
        return torch.where(negative, -kept, kept)

    def decode(self, parts: Parts, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        mask, negative, scale = self._mask_and_signs(parts, math.prod(shape))
        out = torch.zeros(mask.numel(), dtype=dtype, device=mask.device)
        out[mask] = self._kept_values(negative, scale, dtype)
        return out.view(tuple(shape))

    @torch.no_grad()
    def add_into(self, target: Tensor, parts: Parts, weight: float) -> None:
        flat = flat_target(target)
        mask, negative, scale = self._mask_and_signs(parts, flat.numel())
        values = self._kept_values(negative, scale, compute_dtype(flat.dtype))
        add_at_indices(flat, mask.nonzero().squeeze(1), weight * values)

    def check_parts(self, part_meta: PartMeta, shape: Sequence[int]) -> list[str]:
        problems = meta_problems(part_meta, self.part_names)
        if problems:
            return problems
        numel = math.prod(shape)
        problems = mask_problems(part_meta, numel)
        sign_shape, sign_dtype = part_meta["sign"]
        if sign_dtype != torch.uint8 or len(sign_shape) != 1 or sign_shape[0] > math.ceil(numel / 8):
            problems.append(f"part 'sign' is {sign_dtype} {list(sign_shape)}, expected 1-D uint8 of at most "
                            f"{math.ceil(numel / 8)} bytes")
        if part_meta["scale"] != ((1,), torch.float32):
            problems.append(f"part 'scale' is {part_meta['scale'][1]} {list(part_meta['scale'][0])}, "
                            "expected float32 [1]")
        return problems

    def kept_count(self, parts: Parts) -> int | None:
        return int(torch.count_nonzero(unpack_bits(parts["mask"], parts["mask"].numel() * 8)))
