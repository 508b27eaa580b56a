"""Storage codecs for one tensor of a task vector: the contract and registry in
:mod:`deltaserve.experts.codecs.base`, one module per codec beside it (sparse,
sparse_ef, ternary, sign, lowrank, dense). ``CODECS`` imports them all on first use."""

from deltaserve.experts.codecs.base import CODECS, Codec, FactorCodec, SparseEntriesCodec, codec, get_codec

__all__ = ["CODECS", "Codec", "FactorCodec", "SparseEntriesCodec", "codec", "get_codec"]
