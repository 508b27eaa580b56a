"""The ``sparse_ef`` codec: kept positions Elias–Fano coded, so the index bytes fall with density.

The bitmask ``sparse`` codec pays 1 bit per parameter whatever the density: at
1 % kept with fp16 values that is 1.16 bits/param, 86 % of it mask. Here the
sorted flat indices of the kept entries are stored with the Elias–Fano code
(Elias 1974, Fano 1971; layout as in Vigna, "Quasi-succinct indices", WSDM
2013) in about ``log2(1 / density) + 2`` bits per kept entry: 0.48-0.56 bit
per entry above log2 C(n, m) / m, the fewest bits any code of the positions
can average, at densities 0.1 %-10 %. At 1 % that is 8.56 bits per kept
entry, and 0.2456 bits/param in all with fp16 values
(results/kernels/README.md).

The code, for ``m`` kept entries of a tensor of ``n`` parameters (sorted flat
index ``x_i``, row-major):

- ``low = low_bits(n, m) = floor(log2(n / m))`` (0 when ``m == 0``);
- part ``index_low``: ``x_i mod 2**low`` for every ``i``, as ``low``-bit fields
  (``experts.bitpack.pack_uints``: most significant bit first, packed);
- part ``index_high``: a bitvector of ``high_bit_count(n, m) = m + ((n - 1) >> low)``
  bits (0 when ``m == 0``) with a 1 at position ``(x_i >> low) + i`` for every
  ``i`` and 0 elsewhere, packed like a bitmask;
- part ``values``: the kept values, in index order, in ``value_dtype``.

Both index parts therefore have a byte size fixed by ``(n, m)``, and ``m`` is
the length of ``values``: ``check_parts`` checks everything from the header.
Decoding is vectorised (one ``nonzero`` over ~2.5 m bits and one unpack of
``m * low`` bits); the per-entry scatter is the bitmask codec's, shared in
``experts.bitpack.add_at_indices``. Measured ``add_into`` time at 1 %: about
0.3x the bitmask codec's (``bench/kernels/sparse_codecs.py``, same README).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from deltaserve.experts.bitpack import (VALUE_DTYPES, PartMeta, Parts, add_entries, check_input, check_value_dtype,
                                        flat_target, meta_problems, pack_bits, pack_uints, require_parts, unpack_bits,
                                        unpack_uints)
from deltaserve.experts.codecs.base import CodecDefaults, codec

NAME = "sparse_ef"
_HIGH, _LOW, _VALUES = "index_high", "index_low", "values"


# ------------------------------------------------------------ Elias–Fano, pure


def low_bits(numel: int, kept: int) -> int:
    """Width of the low fields: ``floor(log2(numel / kept))``, 0 when nothing is kept."""
    if not 0 <= kept <= numel:
        raise ValueError(f"kept must be in [0, numel={numel}], got {kept}")
    return (numel // kept).bit_length() - 1 if kept else 0


def high_bit_count(numel: int, kept: int) -> int:
    """Length in bits of the high (unary) bitvector: ``kept + ((numel - 1) >> low_bits)``, 0 when nothing is kept."""
    return kept + ((numel - 1) >> low_bits(numel, kept)) if kept else 0


def index_part_bytes(numel: int, kept: int) -> dict[str, int]:
    """Exact bytes of ``index_high`` and ``index_low`` for ``kept`` entries of ``numel``."""
    return {_HIGH: math.ceil(high_bit_count(numel, kept) / 8),
            _LOW: math.ceil(kept * low_bits(numel, kept) / 8)}


def elias_fano_encode(index: Tensor, numel: int) -> tuple[Tensor, Tensor]:
    """Strictly increasing int64 ``index`` (all < ``numel``) -> packed ``(index_high, index_low)``."""
    kept = index.numel()
    low = low_bits(numel, kept)
    high = torch.zeros(high_bit_count(numel, kept), dtype=torch.bool, device=index.device)
    high[(index >> low) + torch.arange(kept, device=index.device)] = True
    return pack_bits(high), pack_uints(index & ((1 << low) - 1), low)


def index_part_problems(part_meta: PartMeta, kept: int, numel: int) -> list[str]:
    """Problems of ``index_high`` / ``index_low`` from their shapes and dtypes (``kept`` = length of ``values``)."""
    problems = []
    for part, size in index_part_bytes(numel, kept).items():
        shape, dtype = part_meta[part]
        if dtype != torch.uint8 or tuple(shape) != (size,):
            problems.append(f"part {part!r} is {dtype} {list(shape)}, expected uint8 [{size}] for {kept} kept "
                            f"entries of {numel} parameters")
    return problems


def elias_fano_decode(high: Tensor, low: Tensor, kept: int, numel: int) -> Tensor:
    """Packed parts -> the ``kept`` int64 indices; ValueError naming the part when they are not
    the code of ``kept`` strictly increasing indices below ``numel``."""
    problems = index_part_problems({_HIGH: (tuple(high.shape), high.dtype), _LOW: (tuple(low.shape), low.dtype)},
                                   kept, numel)
    if problems:
        raise ValueError("; ".join(problems))
    ones = unpack_bits(high, 8 * high.numel(), part=_HIGH).nonzero().squeeze(1)
    if ones.numel() != kept:
        raise ValueError(f"part {_HIGH!r} codes {ones.numel()} entries but part {_VALUES!r} holds {kept}")
    if kept and int(ones[-1]) >= high_bit_count(numel, kept):
        raise ValueError(f"part {_HIGH!r} has a 1 in its padding (bit {int(ones[-1])}, "
                         f"{high_bit_count(numel, kept)} bits used)")
    width = low_bits(numel, kept)
    index = ((ones - torch.arange(kept, device=ones.device)) << width) | unpack_uints(low, kept, width, part=_LOW)
    if kept > 1:
        steps = index[1:] <= index[:-1]
        if bool(steps.any()):
            at = int(steps.nonzero()[0])
            raise ValueError(f"parts {_HIGH!r}/{_LOW!r} decode to indices that are not strictly increasing "
                             f"(entry {at + 1}: {int(index[at + 1])} after {int(index[at])})")
    if kept and int(index[-1]) >= numel:
        raise ValueError(f"parts {_HIGH!r}/{_LOW!r} decode to index {int(index[-1])}, out of range for "
                         f"{numel} parameters")
    return index


def sparse_codec_for(density: float) -> str:
    """The sparse codec with fewer bytes at ``density`` (same values, so compare the positions):
    ``sparse_ef`` while its index bits stay below the bitmask's 1 bit/param (density ≲ 0.25), else ``sparse``."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    numel = 1 << 24
    kept = round(density * numel)
    index_bits = high_bit_count(numel, kept) + kept * low_bits(numel, kept)
    return NAME if index_bits < numel else "sparse"


# ----------------------------------------------------------------------- codec


@codec(NAME)
class EliasFanoSparseCodec(CodecDefaults):
    """Kept positions Elias–Fano coded (~log2(1/density) + 2 bits each) + the kept values in ``value_dtype``."""

    part_names = (_HIGH, _LOW, _VALUES)
    sparse_entries = True

    def encode(self, tensor: Tensor, *, value_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
        check_value_dtype(value_dtype)
        check_input(tensor, NAME)
        flat = tensor.reshape(-1)
        index = (flat != 0).nonzero().squeeze(1)
        high, low = elias_fano_encode(index, flat.numel())
        return {_HIGH: high, _LOW: low, _VALUES: flat[index].to(value_dtype).contiguous()}

    def _index(self, parts: Parts, numel: int) -> Tensor:
        """The kept entries' flat indices, after checking every part against ``numel``."""
        require_parts(parts, self.part_names, NAME)
        values = parts[_VALUES]
        if values.dtype not in VALUE_DTYPES or values.dim() != 1:
            raise ValueError(f"part {_VALUES!r} is {values.dtype} {list(values.shape)}, expected 1-D of {VALUE_DTYPES}")
        if values.numel() > numel:
            raise ValueError(f"part {_VALUES!r} holds {values.numel()} entries for {numel} parameters")
        return elias_fano_decode(parts[_HIGH], parts[_LOW], values.numel(), numel)

    def decode(self, parts: Parts, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        index = self._index(parts, math.prod(shape))
        out = torch.zeros(math.prod(shape), dtype=dtype, device=index.device)
        out[index] = parts[_VALUES].to(dtype)
        return out.view(tuple(shape))

    @torch.no_grad()
    def add_into(self, target: Tensor, parts: Parts, weight: float) -> None:
        flat = flat_target(target)
        add_entries(flat, *self.entries(parts, flat.numel()), weight)

    def entries(self, parts: Parts, numel: int) -> tuple[Tensor, Tensor]:
        """``(flat indices int64, values as stored)`` of the kept entries: what ``add_into`` adds."""
        return self._index(parts, numel), parts[_VALUES]

    def check_parts(self, part_meta: PartMeta, shape: Sequence[int]) -> list[str]:
        problems = meta_problems(part_meta, self.part_names)
        if problems:
            return problems
        numel = math.prod(shape)
        values_shape, values_dtype = part_meta[_VALUES]
        if len(values_shape) != 1 or values_dtype not in VALUE_DTYPES:
            return [f"part {_VALUES!r} is {values_dtype} {list(values_shape)}, expected 1-D of {VALUE_DTYPES}"]
        kept = values_shape[0]
        if kept > numel:
            return [f"part {_VALUES!r} holds {kept} entries for {numel} parameters"]
        return index_part_problems(part_meta, kept, numel)

    def kept_count(self, parts: Parts) -> int | None:
        return parts[_VALUES].numel()
