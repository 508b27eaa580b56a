"""Storage codecs for one tensor of a task vector.

A codec turns a dense tensor that a compressor has *already* compressed
(mostly zeros for ``sparse``, values in {-a, 0, +a} for ``ternary``) into a
few named parts to store, and applies those parts back onto a weight.
Every codec has the same shape and is registered once with ``@codec(name)``:

- ``encode(tensor, *, value_dtype=torch.float16) -> dict[str, Tensor]``
- ``decode(parts, shape, dtype) -> Tensor``
- ``add_into(target, parts, weight) -> None``: in place ``target += weight * decode(parts)``;
  arithmetic in float32 (float64 for float64 targets), rounded once into
  ``target``'s dtype; at most one extra target-sized tensor is alive.
- ``nbytes(parts) -> int``: exact bytes of the stored parts.
- ``check_parts(part_meta, shape) -> list[str]``: problems found from the
  parts' shapes and dtypes alone (no data read), empty when consistent.
- ``kept_count(parts) -> int | None``: entries kept by the mask (None when the
  codec has no mask: ``dense``, ``lowrank``).
- ``rank(parts) -> int | None``: the factor rank (``lowrank``), else None.

Bitmasks use ``numpy.packbits`` semantics: 1 bit per entry, row-major, the
first entry in the most significant bit, zero padding to a whole byte.

Registered here: ``sparse`` (bitmask + values), ``ternary``, ``lowrank``,
``dense``; and, in ``experts.codec_index`` (imported at the end of this file),
``sparse_ef``: the ``sparse`` codec's input with the positions Elias–Fano
coded instead of a bitmask, fewer bytes below ~25 % density.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
from torch import Tensor

from deltaserve.experts.bitpack import (CHUNK_ENTRIES, VALUE_DTYPES, PartMeta, Parts, add_at_indices, add_entries,
                             add_flat_chunks, check_input, check_value_dtype, compute_dtype, flat_target, mask_problems,
                             meta_problems, pack_bits, parts_nbytes, require_parts, unpack_bits)
from deltaserve.experts.registry import Registry
from deltaserve.experts.sparsify import lowrank as svd_factors



class Codec(Protocol):
    name: str
    part_names: tuple[str, ...]

    def encode(self, tensor: Tensor, *, value_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]: ...
    def decode(self, parts: Parts, shape: Sequence[int], dtype: torch.dtype) -> Tensor: ...
    def add_into(self, target: Tensor, parts: Parts, weight: float) -> None: ...
    def nbytes(self, parts: Parts) -> int: ...
    def check_parts(self, part_meta: PartMeta, shape: Sequence[int]) -> list[str]: ...
    def kept_count(self, parts: Parts) -> int | None: ...
    def rank(self, parts: Parts) -> int | None: ...


CODECS: Registry[Codec] = Registry("codec")


def codec(name: str) -> Callable[[type], type]:
    """Register a codec class under ``name`` (one instance is kept)."""

    def register(cls: type) -> type:
        cls.name = name
        CODECS.add(name, cls())
        return cls

    return register


def get_codec(name: str) -> Codec:
    return CODECS[name]


# ------------------------------------------------------------------- codecs


@codec("sparse")
class SparseCodec:
    """Packed 1-bit mask + the non-zero values (row-major) in ``value_dtype``."""

    part_names = ("mask", "values")

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

    def nbytes(self, parts: Parts) -> int:
        return parts_nbytes(parts)

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

    def rank(self, parts: Parts) -> int | None:
        return None


@codec("ternary")
class TernaryCodec:
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

    def nbytes(self, parts: Parts) -> int:
        return parts_nbytes(parts)

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

    def rank(self, parts: Parts) -> int | None:
        return None


@codec("lowrank")
class LowRankCodec:
    """Factors ``A`` [r, in] and ``B`` [out, r] with delta = B @ A (LoRA convention).

    Any LoRA scaling (alpha / r) must be folded into ``B`` by the caller.
    ``encode`` on a dense tensor needs ``rank=`` and does a truncated SVD
    (sqrt of the singular values goes to each factor); LoRA experts should use
    ``encode_factors(A, B)`` so nothing is recomputed.
    """

    part_names = ("A", "B")

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

    def nbytes(self, parts: Parts) -> int:
        return parts_nbytes(parts)

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

    def kept_count(self, parts: Parts) -> int | None:
        return None

    def rank(self, parts: Parts) -> int | None:
        return int(parts["A"].shape[0])


@codec("dense")
class DenseCodec:
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

    def nbytes(self, parts: Parts) -> int:
        return parts_nbytes(parts)

    def check_parts(self, part_meta: PartMeta, shape: Sequence[int]) -> list[str]:
        problems = meta_problems(part_meta, self.part_names)
        if problems:
            return problems
        values_shape, values_dtype = part_meta["values"]
        if values_shape != tuple(shape) or values_dtype not in VALUE_DTYPES:
            problems.append(f"part 'values' is {values_dtype} {list(values_shape)}, expected {list(shape)} "
                            f"of {VALUE_DTYPES}")
        return problems

    def kept_count(self, parts: Parts) -> int | None:
        return None

    def rank(self, parts: Parts) -> int | None:
        return None


# Codecs kept in their own module (this file's size); importing registers them.
from deltaserve.experts import codec_index, codec_sign  # noqa: F401,E402  (they import `codec` from here: keep this last)
