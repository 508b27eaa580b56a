"""The codec family's contract and registry: ``@codec(name)`` on a class, one file per codec.

A codec turns a dense tensor that a compressor has *already* compressed
(mostly zeros for ``sparse``, values in {-a, 0, +a} for ``ternary``) into a
few named parts to store, and applies those parts back onto a weight.
Every codec has the same shape (:class:`Codec`) and is registered once with
``@codec(name)`` in its own module of this package; the registry imports every
module of the package on first use, so a new codec is one new file.

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

Capabilities, declared by the class instead of callers comparing codec names:

- ``lowrank``: the parts are factors, ``factors(parts, shape, dtype) -> (A, B)``
  with delta = B @ A; such experts can be served as LoRA adapters.
- ``sparse_entries``: ``entries(parts, numel) -> (flat int64 indices, values)``
  gives the kept entries that ``add_into`` adds (the dense path caches them).

Bitmasks use ``numpy.packbits`` semantics (experts.bitpack).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor

from deltaserve.experts.bitpack import PartMeta, Parts, parts_nbytes
from deltaserve.experts.registry import Registry


class Codec(Protocol):
    name: str
    part_names: tuple[str, ...]
    lowrank: ClassVar[bool]
    sparse_entries: ClassVar[bool]

    def encode(self, tensor: Tensor, *, value_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]: ...
    def decode(self, parts: Parts, shape: Sequence[int], dtype: torch.dtype) -> Tensor: ...
    def add_into(self, target: Tensor, parts: Parts, weight: float) -> None: ...
    def nbytes(self, parts: Parts) -> int: ...
    def check_parts(self, part_meta: PartMeta, shape: Sequence[int]) -> list[str]: ...
    def kept_count(self, parts: Parts) -> int | None: ...
    def rank(self, parts: Parts) -> int | None: ...


class FactorCodec(Codec, Protocol):
    """What a codec with ``lowrank = True`` adds: its parts are the factors of ``delta = B @ A``."""

    def factors(self, parts: Parts, shape: Sequence[int], dtype: torch.dtype) -> tuple[Tensor, Tensor]: ...
    def encode_factors(self, A: Tensor, B: Tensor, *,
                       value_dtype: torch.dtype = torch.float16) -> dict[str, Tensor]: ...


class SparseEntriesCodec(Codec, Protocol):
    """What a codec with ``sparse_entries = True`` adds: the kept entries that ``add_into`` adds."""

    def entries(self, parts: Parts, numel: int) -> tuple[Tensor, Tensor]: ...


class CodecDefaults:
    """What most codecs share, to inherit: the stored bytes are the parts' bytes, no mask count, no rank,
    no capability."""

    lowrank: ClassVar[bool] = False
    sparse_entries: ClassVar[bool] = False

    def nbytes(self, parts: Parts) -> int:
        return parts_nbytes(parts)

    def kept_count(self, parts: Parts) -> int | None:
        return None

    def rank(self, parts: Parts) -> int | None:
        return None


CODECS: Registry[Codec] = Registry("codec", package="deltaserve.experts.codecs")


def codec(name: str) -> Callable[[type], type]:
    """Register a codec class under ``name`` (one instance is kept); capabilities default to off."""

    def register(cls: type[Any]) -> type[Any]:
        cls.name = name
        for capability in ("lowrank", "sparse_entries"):
            if not isinstance(getattr(cls, capability, False), bool):
                raise TypeError(f"codec {name!r}: {capability} must be a bool class attribute")
            setattr(cls, capability, getattr(cls, capability, False))
        CODECS.add(name, cls())
        return cls

    return register


def get_codec(name: str) -> Codec:
    return CODECS[name]
