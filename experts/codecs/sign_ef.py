"""The ``sign_ef`` codec: a sparse task vector whose kept entries are ``±scale``: Elias–Fano coded positions
(as ``sparse_ef``), one sign bit per kept entry and one float32 scale per tensor.

BitDelta's idea (one sign bit and one scale) applied to a sparse support (magnitude, DARE, NPS, Breadcrumbs:
any compressor's ``values="sign"``): at 0.25 % kept a kept entry costs ~11.6 bits (log2(1/density) + 2 for
its position, 1 for its sign), 0.029 bits per parameter in all — against ~26 bits and 0.065 bits/param with
fp16 values (``sparse_ef``).

Parts, for ``m`` kept entries of a tensor of ``n`` parameters:

- ``index_high``, ``index_low``: the kept entries' sorted flat indices, Elias–Fano coded exactly as
  ``sparse_ef`` codes them (experts.codecs.sparse_ef);
- ``sign``: ``m`` bits, 1 where the entry is negative, packed like every bitmask here;
- ``kept``: int64 ``[1]``, ``m`` (the sign bits alone fix it only to a multiple of 8);
- ``scale``: float32 ``[1]``, the magnitude every kept entry has (>= 0, finite).

``encode`` refuses a tensor whose non-zero entries do not share one magnitude (compress with ``values="sign"``
first). ``add_into`` and ``entries`` are ``sparse_ef``'s: the kept entries' indices and ``±scale`` values,
added by one scatter (so the dense path caches them like any sparse expert's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from deltaserve.experts.bitpack import (PartMeta, Parts, add_entries, check_input, check_value_dtype, flat_target,
                                        meta_problems, pack_bits, require_parts, unpack_bits)
from deltaserve.experts.codecs.base import CodecDefaults, codec
from deltaserve.experts.codecs.sparse_ef import (_HIGH, _LOW, elias_fano_decode, elias_fano_encode,
                                                 index_part_problems)

NAME = "sign_ef"
_SIGN, _KEPT, _SCALE = "sign", "kept", "scale"


@codec(NAME)
class EliasFanoSignCodec(CodecDefaults):
    """Elias–Fano positions + one sign bit per kept entry + one float32 scale: ~log2(1/density) + 3 bits per
    kept entry."""

    part_names = (_HIGH, _LOW, _SIGN, _KEPT, _SCALE)
    sparse_entries = True

    def encode(self, tensor: Tensor, *, value_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
        check_value_dtype(value_dtype)   # accepted for the common signature; the scale is float32
        check_input(tensor, NAME)
        flat = tensor.reshape(-1)
        index = (flat != 0).nonzero().squeeze(1)
        values = flat[index]
        magnitudes = values.abs().unique()
        if magnitudes.numel() > 1:
            raise ValueError(f"sign_ef codec needs values in {{-a, 0, +a}}; got {magnitudes.numel()} distinct "
                             "magnitudes; compress with values='sign' first")
        high, low = elias_fano_encode(index, flat.numel())
        scale = magnitudes.to(torch.float32) if magnitudes.numel() else torch.zeros(1)
        return {_HIGH: high, _LOW: low, _SIGN: pack_bits(values < 0),
                _KEPT: torch.tensor([index.numel()], dtype=torch.int64), _SCALE: scale.reshape(1)}

    def _unpack(self, parts: Parts, numel: int) -> tuple[Tensor, Tensor, float]:
        require_parts(parts, self.part_names, NAME)
        kept_part, scale_part = parts[_KEPT], parts[_SCALE]
        if kept_part.dtype != torch.int64 or tuple(kept_part.shape) != (1,):
            raise ValueError(f"part {_KEPT!r} must be int64 [1], got {kept_part.dtype} {list(kept_part.shape)}")
        if scale_part.dtype != torch.float32 or tuple(scale_part.shape) != (1,):
            raise ValueError(f"part {_SCALE!r} must be float32 [1], got {scale_part.dtype} {list(scale_part.shape)}")
        kept, scale = int(kept_part.item()), float(scale_part.item())
        if not 0 <= kept <= numel:
            raise ValueError(f"part {_KEPT!r} says {kept} kept entries for {numel} parameters")
        if not math.isfinite(scale) or scale < 0:
            raise ValueError(f"part {_SCALE!r} must be finite and >= 0, got {scale}")
        sign = parts[_SIGN]
        if sign.dtype != torch.uint8 or tuple(sign.shape) != (math.ceil(kept / 8),):
            raise ValueError(f"part {_SIGN!r} is {sign.dtype} {list(sign.shape)}, expected uint8 "
                             f"[{math.ceil(kept / 8)}] for {kept} kept entries")
        index = elias_fano_decode(parts[_HIGH], parts[_LOW], kept, numel)
        return index, unpack_bits(sign, kept, part=_SIGN), scale

    def entries(self, parts: Parts, numel: int) -> tuple[Tensor, Tensor]:
        """``(flat indices int64, values float32 ±scale)`` of the kept entries: what ``add_into`` adds."""
        index, negative, scale = self._unpack(parts, numel)
        values = torch.full((index.numel(),), scale, dtype=torch.float32)
        return index, torch.where(negative, -values, values)

    def decode(self, parts: Parts, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        index, values = self.entries(parts, math.prod(shape))
        out = torch.zeros(math.prod(shape), dtype=dtype)
        out[index] = values.to(dtype)
        return out.view(tuple(shape))

    @torch.no_grad()
    def add_into(self, target: Tensor, parts: Parts, weight: float) -> None:
        flat = flat_target(target)
        add_entries(flat, *self.entries(parts, flat.numel()), weight)

    def check_parts(self, part_meta: PartMeta, shape: Sequence[int]) -> list[str]:
        problems = meta_problems(part_meta, self.part_names)
        if problems:
            return problems
        out = [f"part {part!r} is {part_meta[part][1]} {list(part_meta[part][0])}, expected {want}"
               for part, want in ((_KEPT, ((1,), torch.int64)), (_SCALE, ((1,), torch.float32)))
               if part_meta[part] != want]
        sign_shape, sign_dtype = part_meta[_SIGN]
        if sign_dtype != torch.uint8 or len(sign_shape) != 1:
            return [*out, f"part {_SIGN!r} is {sign_dtype} {list(sign_shape)}, expected 1-D uint8"]
        numel, size = math.prod(shape), sign_shape[0]
        # the header fixes the kept count to the 8 values whose sign bits fill ``size`` bytes: one must fit the index
        candidates = [0] if size == 0 else range(8 * size - 7, min(8 * size, numel) + 1)
        if not any(not index_part_problems(part_meta, kept, numel) for kept in candidates):
            out.append(f"parts {_HIGH!r}/{_LOW!r} do not code the {8 * size - 7}-{8 * size} entries that part "
                       f"{_SIGN!r} has signs for ({numel} parameters)")
        return out

    def kept_count(self, parts: Parts) -> int | None:
        return int(parts[_KEPT].item())
