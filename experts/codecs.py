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

Bitmasks use ``numpy.packbits`` semantics: 1 bit per entry, row-major, the
first entry in the most significant bit, zero padding to a whole byte.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor

from experts.registry import Registry

Parts = Mapping[str, Tensor]
PartMeta = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
VALUE_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
# Rows (or flat entries) handled per step when a whole dense tensor is added in.
_CHUNK_ENTRIES = 1 << 20
_BIT_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


class Codec(Protocol):
    name: str
    part_names: tuple[str, ...]

    def encode(self, tensor: Tensor, *, value_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]: ...
    def decode(self, parts: Parts, shape: Sequence[int], dtype: torch.dtype) -> Tensor: ...
    def add_into(self, target: Tensor, parts: Parts, weight: float) -> None: ...
    def nbytes(self, parts: Parts) -> int: ...
    def check_parts(self, part_meta: PartMeta, shape: Sequence[int]) -> list[str]: ...
    def kept_count(self, parts: Parts) -> int | None: ...


CODECS: Registry[Codec] = Registry("codec")


def codec(name: str) -> Callable[[type], type]:
    """Register a codec class under ``name`` (one instance is kept)."""

    def register(cls: type) -> type:
        if name in CODECS:
            raise ValueError(f"codec {name!r} is already registered")
        cls.name = name
        CODECS.add(name, cls())
        return cls

    return register


def get_codec(name: str) -> Codec:
    return CODECS[name]


# --------------------------------------------------------------------------- bits


def pack_bits(mask: Tensor) -> Tensor:
    """Bool tensor -> uint8 tensor of ceil(numel/8) bytes (numpy.packbits order)."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) << _BIT_SHIFTS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, count: int, *, part: str = "mask") -> Tensor:
    """uint8 tensor -> bool tensor of ``count`` entries; padding bits must be zero."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"part {part!r} must be a 1-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    if packed.numel() != math.ceil(count / 8):
        raise ValueError(f"part {part!r} holds {packed.numel() * 8} bits for {count} entries")
    bits = ((packed.unsqueeze(1) >> _BIT_SHIFTS.to(packed.device)) & 1).reshape(-1).bool()
    if bits[count:].any():
        raise ValueError(f"part {part!r} has non-zero padding bits after entry {count}")
    return bits[:count]


# ------------------------------------------------------------------- helpers


def parts_nbytes(parts: Parts) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


def _check_value_dtype(value_dtype: torch.dtype) -> None:
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {VALUE_DTYPES}, got {value_dtype}")


def _check_input(tensor: Tensor, codec_name: str) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"{codec_name} codec needs a floating tensor, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{codec_name} codec got a tensor with NaN or Inf entries")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _flat_target(target: Tensor) -> Tensor:
    if not target.is_floating_point():
        raise ValueError(f"target must be a floating tensor, got {target.dtype}")
    if not target.is_contiguous():
        raise ValueError("target must be contiguous to be updated in place")
    return target.view(-1)


def _require_parts(parts: Parts, names: tuple[str, ...], codec_name: str) -> None:
    missing = [n for n in names if n not in parts]
    extra = sorted(set(parts) - set(names))
    if missing or extra:
        raise ValueError(f"{codec_name} codec expects parts {list(names)}; missing {missing}, unexpected {extra}")


def _meta_problems(part_meta: PartMeta, names: tuple[str, ...]) -> list[str]:
    problems = [f"missing part {n!r}" for n in names if n not in part_meta]
    problems += [f"unexpected part {n!r}" for n in sorted(set(part_meta) - set(names))]
    return problems


def _mask_problems(part_meta: PartMeta, numel: int) -> list[str]:
    mask_shape, mask_dtype = part_meta["mask"]
    if mask_dtype != torch.uint8 or mask_shape != (math.ceil(numel / 8),):
        return [f"part 'mask' is {mask_dtype} {list(mask_shape)}, expected uint8 [{math.ceil(numel / 8)}] "
                f"for {numel} entries"]
    return []


def _add_at_indices(flat: Tensor, index: Tensor, delta: Tensor) -> None:
    """``flat[index] += delta`` in the compute dtype, rounded once into ``flat``."""
    compute = _compute_dtype(flat.dtype)
    updated = flat.index_select(0, index).to(compute) + delta.to(compute)
    flat.index_copy_(0, index, updated.to(flat.dtype))


def _add_flat_chunks(flat: Tensor, values: Tensor, weight: float) -> None:
    """``flat += weight * values`` in chunks, so no target-sized temporary exists."""
    compute = _compute_dtype(flat.dtype)
    for start in range(0, flat.numel(), _CHUNK_ENTRIES):
        seg = flat[start:start + _CHUNK_ENTRIES]
        src = values[start:start + _CHUNK_ENTRIES].to(compute)
        seg.copy_(seg.to(compute) + weight * src)


# ------------------------------------------------------------------- codecs


@codec("sparse")
class SparseCodec:
    """Packed 1-bit mask + the non-zero values (row-major) in ``value_dtype``."""

    part_names = ("mask", "values")

    def encode(self, tensor: Tensor, *, value_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
        _check_value_dtype(value_dtype)
        _check_input(tensor, "sparse")
        mask = tensor.reshape(-1) != 0
        return {"mask": pack_bits(mask), "values": tensor.reshape(-1)[mask].to(value_dtype).contiguous()}

    def _mask(self, parts: Parts, numel: int) -> Tensor:
        _require_parts(parts, self.part_names, "sparse")
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
        flat = _flat_target(target)
        _require_parts(parts, self.part_names, "sparse")
        values = parts["values"]
        # One pass over the mask (nonzero) instead of _mask's extra count: this is the dense path's hot loop.
        index = unpack_bits(parts["mask"], flat.numel()).nonzero().squeeze(1)
        if not values.is_floating_point() or values.dim() != 1 or values.numel() != index.numel():
            raise ValueError(f"part 'values' is {values.dtype} {list(values.shape)} but the mask keeps "
                             f"{index.numel()} entries")
        _add_at_indices(flat, index, values.to(_compute_dtype(flat.dtype)) * weight)

    def nbytes(self, parts: Parts) -> int:
        return parts_nbytes(parts)

    def check_parts(self, part_meta: PartMeta, shape: Sequence[int]) -> list[str]:
        problems = _meta_problems(part_meta, self.part_names)
        if problems:
            return problems
        problems = _mask_problems(part_meta, math.prod(shape))
        values_shape, values_dtype = part_meta["values"]
        if len(values_shape) != 1 or values_dtype not in VALUE_DTYPES:
            problems.append(f"part 'values' is {values_dtype} {list(values_shape)}, expected 1-D of {VALUE_DTYPES}")
        elif values_shape[0] > math.prod(shape):
            problems.append(f"part 'values' holds {values_shape[0]} entries for {math.prod(shape)} parameters")
        return problems

    def kept_count(self, parts: Parts) -> int | None:
        return parts["values"].numel()


@codec("ternary")
class TernaryCodec:
    """Packed mask + packed sign bits of the kept entries (1 = negative) + one float32 scale.

    ``value_dtype`` is accepted for a uniform signature and ignored: the scale
    is always float32, so ternary float16/bfloat16/float32 input round-trips
    exactly (a float64 magnitude is rounded to float32).
    """

    part_names = ("mask", "sign", "scale")

    def encode(self, tensor: Tensor, *, value_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
        _check_value_dtype(value_dtype)
        _check_input(tensor, "ternary")
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
        _require_parts(parts, self.part_names, "ternary")
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
        flat = _flat_target(target)
        mask, negative, scale = self._mask_and_signs(parts, flat.numel())
        values = self._kept_values(negative, scale, _compute_dtype(flat.dtype))
        _add_at_indices(flat, mask.nonzero().squeeze(1), weight * values)

    def nbytes(self, parts: Parts) -> int:
        return parts_nbytes(parts)

    def check_parts(self, part_meta: PartMeta, shape: Sequence[int]) -> list[str]:
        problems = _meta_problems(part_meta, self.part_names)
        if problems:
            return problems
        numel = math.prod(shape)
        problems = _mask_problems(part_meta, numel)
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
        _check_value_dtype(value_dtype)
        _check_input(A, "lowrank")
        _check_input(B, "lowrank")
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] < 1:
            raise ValueError(f"lowrank factors must be A [r, in], B [out, r] with r >= 1; "
                             f"got A {list(A.shape)}, B {list(B.shape)}")
        return {"A": A.to(value_dtype).contiguous(), "B": B.to(value_dtype).contiguous()}

    def encode(self, tensor: Tensor, *, value_dtype: torch.dtype = torch.float16,
               rank: int | None = None) -> dict[str, Tensor]:
        if rank is None:
            raise ValueError("lowrank codec cannot store a dense tensor as is: pass rank=<int> for a truncated "
                             "SVD, or use encode_factors(A, B) with the factors of a low-rank compressor/LoRA")
        _check_input(tensor, "lowrank")
        if tensor.dim() != 2 or not 1 <= rank <= min(tensor.shape):
            raise ValueError(f"rank must be in [1, {min(tensor.shape) if tensor.dim() == 2 else '?'}] "
                             f"for a 2-D tensor; got rank={rank} for shape {list(tensor.shape)}")
        U, S, Vh = torch.linalg.svd(tensor.to(_compute_dtype(tensor.dtype)), full_matrices=False)
        root = S[:rank].sqrt()
        return self.encode_factors(root[:, None] * Vh[:rank], U[:, :rank] * root, value_dtype=value_dtype)

    def _factors(self, parts: Parts, shape: Sequence[int], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        _require_parts(parts, self.part_names, "lowrank")
        problems = self.check_parts({k: (tuple(v.shape), v.dtype) for k, v in parts.items()}, shape)
        if problems:
            raise ValueError("; ".join(problems))
        return parts["A"].to(dtype), parts["B"].to(dtype)

    def decode(self, parts: Parts, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        A, B = self._factors(parts, shape, _compute_dtype(dtype))
        return (B @ A).to(dtype)

    @torch.no_grad()
    def add_into(self, target: Tensor, parts: Parts, weight: float) -> None:
        _flat_target(target)
        compute = _compute_dtype(target.dtype)
        A, B = self._factors(parts, tuple(target.shape), compute)
        rows_per_chunk = max(1, _CHUNK_ENTRIES // max(1, target.shape[1]))
        for start in range(0, target.shape[0], rows_per_chunk):
            block = target[start:start + rows_per_chunk]
            block.copy_(block.to(compute) + weight * (B[start:start + rows_per_chunk] @ A))

    def nbytes(self, parts: Parts) -> int:
        return parts_nbytes(parts)

    def check_parts(self, part_meta: PartMeta, shape: Sequence[int]) -> list[str]:
        problems = _meta_problems(part_meta, self.part_names)
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


@codec("dense")
class DenseCodec:
    """The whole tensor in ``value_dtype`` (reference codec)."""

    part_names = ("values",)

    def encode(self, tensor: Tensor, *, value_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
        _check_value_dtype(value_dtype)
        _check_input(tensor, "dense")
        return {"values": tensor.to(value_dtype).contiguous()}

    def _values(self, parts: Parts, shape: Sequence[int]) -> Tensor:
        _require_parts(parts, self.part_names, "dense")
        values = parts["values"]
        if tuple(values.shape) != tuple(shape):
            raise ValueError(f"part 'values' has shape {list(values.shape)}, expected {list(shape)}")
        return values

    def decode(self, parts: Parts, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        return self._values(parts, shape).to(dtype)

    @torch.no_grad()
    def add_into(self, target: Tensor, parts: Parts, weight: float) -> None:
        flat = _flat_target(target)
        _add_flat_chunks(flat, self._values(parts, tuple(target.shape)).reshape(-1), weight)

    def nbytes(self, parts: Parts) -> int:
        return parts_nbytes(parts)

    def check_parts(self, part_meta: PartMeta, shape: Sequence[int]) -> list[str]:
        problems = _meta_problems(part_meta, self.part_names)
        if problems:
            return problems
        values_shape, values_dtype = part_meta["values"]
        if values_shape != tuple(shape) or values_dtype not in VALUE_DTYPES:
            problems.append(f"part 'values' is {values_dtype} {list(values_shape)}, expected {list(shape)} "
                            f"of {VALUE_DTYPES}")
        return problems

    def kept_count(self, parts: Parts) -> int | None:
        return None
