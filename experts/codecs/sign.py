"""The ``sign`` codec: one sign bit per changed entry and one scale per tensor (BitDelta).

BitDelta (Liu et al., 2024) stores a fine-tune's delta as ``scale * sign(tau)``
with ``scale = mean |tau|`` per matrix: 1 bit per parameter. A full fine-tune
with tied embeddings leaves most embedding rows untouched (no gradient, no
weight decay: tau is exactly 0 there), and ``sign(0)`` must not turn them into
``±scale``. So rows are the unit of sparsity:

- part ``rows``: a bitmask of the rows (first dimension; a 1-D tensor is one
  row) that hold any non-zero entry, packed like every bitmask here;
- part ``sign``: for every entry of those rows, in row-major order, 1 when the
  value is negative, packed;
- part ``scale``: float32 ``[1]``, the magnitude every kept entry has.

An entry of a kept row that is 0 in the input comes back as ``+scale`` — the
BitDelta approximation (the compressor picks the scale); ``encode`` refuses a
tensor whose kept entries do not share one magnitude (zeros of kept rows
aside). Bytes: ``rows/8 + kept_rows * cols / 8 + 4``, about 1 bit per changed
parameter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from deltaserve.experts.bitpack import (PartMeta, Parts, add_at_indices, check_input, check_value_dtype,
                                        compute_dtype, flat_target, meta_problems, pack_bits, require_parts,
                                        unpack_bits)
from deltaserve.experts.codecs.base import CodecDefaults, codec

NAME = "sign"


def _rows_cols(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) == 0:
        return 1, 1
    rows = int(shape[0]) if len(shape) > 1 else 1
    return rows, math.prod(shape) // max(1, rows)


@codec(NAME)
class SignCodec(CodecDefaults):
    """Packed bitmask of the changed rows + one sign bit per entry of those rows + one float32 scale (BitDelta).
    No kept count: kept rows are stored whole, so a density would say nothing about the bytes."""

    part_names = ("rows", "sign", "scale")

    def encode(self, tensor: Tensor, *, value_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
        check_value_dtype(value_dtype)
        check_input(tensor, NAME)
        rows, cols = _rows_cols(tensor.shape)
        grid = tensor.reshape(rows, cols)
        kept_rows = (grid != 0).any(dim=1)
        kept = grid[kept_rows]
        magnitudes = kept[kept != 0].abs().unique()
        if magnitudes.numel() > 1:
            raise ValueError(f"sign codec needs values in {{-a, +a}} (and zero rows); got {magnitudes.numel()} "
                             f"distinct magnitudes; compress with the bitdelta compressor first")
        scale = magnitudes.to(torch.float32) if magnitudes.numel() else torch.zeros(1)
        return {"rows": pack_bits(kept_rows), "sign": pack_bits(kept < 0), "scale": scale.reshape(1)}

    def _unpack(self, parts: Parts, shape: Sequence[int]) -> tuple[Tensor, Tensor, float, int]:
        require_parts(parts, self.part_names, NAME)
        rows, cols = _rows_cols(shape)
        kept_rows = unpack_bits(parts["rows"], rows, part="rows")
        negative = unpack_bits(parts["sign"], int(kept_rows.sum()) * cols, part="sign")
        scale = parts["scale"]
        if scale.dtype != torch.float32 or tuple(scale.shape) != (1,):
            raise ValueError(f"part 'scale' must be float32 [1], got {scale.dtype} {list(scale.shape)}")
        value = float(scale.item())
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"part 'scale' must be finite and >= 0, got {value}")
        return kept_rows, negative, value, cols

    def decode(self, parts: Parts, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        kept_rows, negative, scale, cols = self._unpack(parts, shape)
        out = torch.zeros((kept_rows.numel(), cols), dtype=dtype)
        values = torch.full(negative.shape, scale, dtype=dtype)
        out[kept_rows] = torch.where(negative, -values, values).view(-1, cols)
        return out.view(tuple(shape))

    @torch.no_grad()
    def add_into(self, target: Tensor, parts: Parts, weight: float) -> None:
        flat = flat_target(target)
        kept_rows, negative, scale, cols = self._unpack(parts, target.shape)
        values = torch.full(negative.shape, weight * scale, dtype=compute_dtype(flat.dtype))
        values = torch.where(negative, -values, values)
        if bool(kept_rows.all()):
            flat.copy_((flat.to(values.dtype) + values).to(flat.dtype))
            return
        index = (kept_rows.nonzero() * cols + torch.arange(cols)).reshape(-1)
        add_at_indices(flat, index, values)

    def check_parts(self, part_meta: PartMeta, shape: Sequence[int]) -> list[str]:
        problems = meta_problems(part_meta, self.part_names)
        if problems:
            return problems
        rows, cols = _rows_cols(shape)
        out = []
        if part_meta["rows"] != ((math.ceil(rows / 8),), torch.uint8):
            out.append(f"part 'rows' is {part_meta['rows'][1]} {list(part_meta['rows'][0])}, expected uint8 "
                       f"[{math.ceil(rows / 8)}] for {rows} rows")
        sign_shape, sign_dtype = part_meta["sign"]
        if sign_dtype != torch.uint8 or len(sign_shape) != 1 or sign_shape[0] > math.ceil(rows * cols / 8):
            out.append(f"part 'sign' is {sign_dtype} {list(sign_shape)}, expected 1-D uint8 of at most "
                       f"{math.ceil(rows * cols / 8)} bytes")
        if part_meta["scale"] != ((1,), torch.float32):
            out.append(f"part 'scale' is {part_meta['scale'][1]} {list(part_meta['scale'][0])}, expected float32 [1]")
        return out
