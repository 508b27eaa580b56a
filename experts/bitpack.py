"""Bit packing and the small checks every codec shares (experts.codecs).

Bitmasks use ``numpy.packbits`` semantics: 1 bit per entry, row-major, the
first entry in the most significant bit, zero padding to a whole byte.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

Parts = Mapping[str, Tensor]
PartMeta = Mapping[str, tuple[tuple[int, ...], torch.dtype]]
VALUE_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
# Rows (or flat entries) handled per step when a whole dense tensor is added in.
CHUNK_ENTRIES = 1 << 20
_BIT_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


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


def check_value_dtype(value_dtype: torch.dtype) -> None:
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {VALUE_DTYPES}, got {value_dtype}")


def check_input(tensor: Tensor, codec_name: str) -> None:
    if not tensor.is_floating_point():
        raise ValueError(f"{codec_name} codec needs a floating tensor, got {tensor.dtype}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{codec_name} codec got a tensor with NaN or Inf entries")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def flat_target(target: Tensor) -> Tensor:
    if not target.is_floating_point():
        raise ValueError(f"target must be a floating tensor, got {target.dtype}")
    if not target.is_contiguous():
        raise ValueError("target must be contiguous to be updated in place")
    return target.view(-1)


def require_parts(parts: Parts, names: tuple[str, ...], codec_name: str) -> None:
    missing = [n for n in names if n not in parts]
    extra = sorted(set(parts) - set(names))
    if missing or extra:
        raise ValueError(f"{codec_name} codec expects parts {list(names)}; missing {missing}, unexpected {extra}")


def meta_problems(part_meta: PartMeta, names: tuple[str, ...]) -> list[str]:
    problems = [f"missing part {n!r}" for n in names if n not in part_meta]
    problems += [f"unexpected part {n!r}" for n in sorted(set(part_meta) - set(names))]
    return problems


def mask_problems(part_meta: PartMeta, numel: int) -> list[str]:
    mask_shape, mask_dtype = part_meta["mask"]
    if mask_dtype != torch.uint8 or mask_shape != (math.ceil(numel / 8),):
        return [f"part 'mask' is {mask_dtype} {list(mask_shape)}, expected uint8 [{math.ceil(numel / 8)}] "
                f"for {numel} entries"]
    return []


def add_at_indices(flat: Tensor, index: Tensor, delta: Tensor) -> None:
    """``flat[index] += delta`` in the compute dtype, rounded once into ``flat``."""
    compute = compute_dtype(flat.dtype)
    updated = flat.index_select(0, index).to(compute) + delta.to(compute)
    flat.index_copy_(0, index, updated.to(flat.dtype))


def add_flat_chunks(flat: Tensor, values: Tensor, weight: float) -> None:
    """``flat += weight * values`` in chunks, so no target-sized temporary exists."""
    compute = compute_dtype(flat.dtype)
    for start in range(0, flat.numel(), CHUNK_ENTRIES):
        seg = flat[start:start + CHUNK_ENTRIES]
        src = values[start:start + CHUNK_ENTRIES].to(compute)
        seg.copy_(seg.to(compute) + weight * src)
