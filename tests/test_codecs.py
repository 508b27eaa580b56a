import math

import numpy as np
import pytest
import torch

from deltaserve.experts.bitpack import pack_bits, unpack_bits
from deltaserve.experts.codecs import CODECS, codec, get_codec

# Tolerance of one add_into against the float32 reference, per target dtype.
ADD_TOL = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.bfloat16: dict(rtol=1e-2, atol=1e-2)}


def sparse_input(shape=(10, 16), kept=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    flat = torch.zeros(math.prod(shape))
    index = torch.randperm(flat.numel(), generator=gen)[:kept]
    flat[index] = torch.randn(kept, generator=gen)
    return flat.view(shape)


def ternary_input(shape=(10, 16), kept=30, scale=0.0375, seed=1):
    gen = torch.Generator().manual_seed(seed)
    flat = torch.zeros(math.prod(shape))
    index = torch.randperm(flat.numel(), generator=gen)[:kept]
    flat[index] = torch.where(torch.rand(kept, generator=gen) < 0.5, -scale, scale)
    return flat.view(shape)


def encoded(name, tensor, value_dtype=torch.float32):
    if name == "lowrank":
        return get_codec(name).encode(tensor, value_dtype=value_dtype, rank=min(tensor.shape))
    return get_codec(name).encode(tensor, value_dtype=value_dtype)


def test_registry_lists_names_and_rejects_duplicates():
    assert {"sparse", "ternary", "lowrank", "dense"} <= set(CODECS)
    with pytest.raises(KeyError, match="known codecs: .*sparse"):
        get_codec("zip")
    with pytest.raises(ValueError, match="'sparse' is already registered"):
        codec("sparse")(type("Again", (), {}))


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 160, 163])
def test_pack_bits_matches_numpy(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    np.testing.assert_array_equal(packed.numpy(), np.packbits(mask.numpy()))
    assert torch.equal(unpack_bits(packed, numel), mask)


def test_unpack_rejects_bad_padding_and_length():
    with pytest.raises(ValueError, match="padding"):
        unpack_bits(torch.tensor([0b00000001], dtype=torch.uint8), 7)
    with pytest.raises(ValueError, match="16 bits for 7 entries"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 7)


def test_sparse_lossless_in_fp32_and_exact_bytes():
    tensor = sparse_input()
    sparse = get_codec("sparse")
    parts = sparse.encode(tensor, value_dtype=torch.float32)
    assert torch.equal(sparse.decode(parts, tensor.shape, torch.float32), tensor)
    assert sparse.kept_count(parts) == 8
    fp16 = sparse.encode(tensor)  # default value_dtype float16
    assert sparse.nbytes(fp16) == 20 + 16  # ceil(160/8) mask bytes + 8 fp16 values
    assert sparse.nbytes(parts) == 20 + 32


@pytest.mark.parametrize("value_dtype,rtol", [(torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
def test_sparse_lossy_value_dtypes_within_tolerance(value_dtype, rtol):
    tensor = sparse_input(seed=3)
    sparse = get_codec("sparse")
    decoded = sparse.decode(sparse.encode(tensor, value_dtype=value_dtype), tensor.shape, torch.float32)
    assert torch.equal(decoded != 0, tensor != 0)
    torch.testing.assert_close(decoded, tensor, rtol=rtol, atol=0)


def test_ternary_exact_and_bytes():
    tensor = ternary_input()
    ternary = get_codec("ternary")
    parts = ternary.encode(tensor)
    assert torch.equal(ternary.decode(parts, tensor.shape, torch.float32), tensor)
    assert parts["scale"].dtype == torch.float32 and parts["scale"].item() == pytest.approx(0.0375)
    assert ternary.nbytes(parts) == 20 + math.ceil(30 / 8) + 4
    assert ternary.kept_count(parts) == 30


def test_ternary_rejects_several_magnitudes():
    tensor = ternary_input()
    tensor.view(-1)[tensor.view(-1).nonzero()[0]] = 0.5
    with pytest.raises(ValueError, match="2 distinct magnitudes"):
        get_codec("ternary").encode(tensor)


def test_ternary_all_zero_tensor():
    ternary = get_codec("ternary")
    parts = ternary.encode(torch.zeros(3, 5))
    assert torch.equal(ternary.decode(parts, (3, 5), torch.float32), torch.zeros(3, 5))


def test_dense_lossless_fp32():
    tensor = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    dense = get_codec("dense")
    parts = dense.encode(tensor, value_dtype=torch.float32)
    assert torch.equal(dense.decode(parts, tensor.shape, torch.float32), tensor)
    assert dense.nbytes(parts) == 4 * 24 and dense.nbytes(dense.encode(tensor)) == 2 * 24


def test_lowrank_factors_and_svd():
    gen = torch.Generator().manual_seed(6)
    A, B = torch.randn(2, 6, generator=gen), torch.randn(5, 2, generator=gen)
    lowrank = get_codec("lowrank")
    parts = lowrank.encode_factors(A, B, value_dtype=torch.float32)
    assert torch.equal(lowrank.decode(parts, (5, 6), torch.float32), B @ A)
    assert lowrank.nbytes(parts) == 4 * (12 + 10)
    svd = lowrank.encode(B @ A, value_dtype=torch.float32, rank=2)
    assert svd["A"].shape == (2, 6) and svd["B"].shape == (5, 2)
    torch.testing.assert_close(lowrank.decode(svd, (5, 6), torch.float32), B @ A, rtol=1e-4, atol=1e-5)


def test_lowrank_dense_encode_needs_rank():
    with pytest.raises(ValueError, match="pass rank=<int>.*encode_factors"):
        get_codec("lowrank").encode(torch.randn(4, 4))
    with pytest.raises(ValueError, match="rank=9"):
        get_codec("lowrank").encode(torch.randn(4, 4), rank=9)
    with pytest.raises(ValueError, match=r"A \[2, 6\], B \[5, 3\]"):
        get_codec("lowrank").encode_factors(torch.randn(2, 6), torch.randn(5, 3))


@pytest.mark.parametrize("name", ["sparse", "dense"])
def test_encode_rejects_bad_value_dtype_and_nan(name):
    with pytest.raises(ValueError, match="value_dtype"):
        get_codec(name).encode(sparse_input(), value_dtype=torch.int8)
    bad = sparse_input()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        get_codec(name).encode(bad)


def test_sparse_decode_rejects_count_mismatch():
    sparse = get_codec("sparse")
    parts = sparse.encode(sparse_input(), value_dtype=torch.float32)
    with pytest.raises(ValueError, match="mask keeps 8 entries"):
        sparse.decode({"mask": parts["mask"], "values": parts["values"][:5]}, (10, 16), torch.float32)
    with pytest.raises(ValueError, match="160 bits for 150 entries"):
        sparse.decode(parts, (10, 15), torch.float32)


@pytest.mark.parametrize("name", ["sparse", "ternary", "dense", "lowrank"])
@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16])
def test_add_into_matches_reference_and_changes_target(name, target_dtype):
    tensor = ternary_input(seed=7) if name == "ternary" else sparse_input(kept=40, seed=7)
    if name in ("dense", "lowrank"):
        tensor = torch.randn(10, 16, generator=torch.Generator().manual_seed(7))
    codec_impl = get_codec(name)
    parts = encoded(name, tensor, value_dtype=torch.float16)
    base = torch.randn(10, 16, generator=torch.Generator().manual_seed(8)).to(target_dtype)
    target, weight = base.clone(), 0.7
    codec_impl.add_into(target, parts, weight)
    reference = (base.float() + weight * codec_impl.decode(parts, base.shape, torch.float32)).to(target_dtype)
    assert target.dtype == target_dtype
    torch.testing.assert_close(target.float(), reference.float(), **ADD_TOL[target_dtype])
    assert not torch.equal(target, base)


def test_add_into_parameter_with_grad_and_bad_targets():
    sparse = get_codec("sparse")
    parts = sparse.encode(sparse_input(), value_dtype=torch.float32)
    param = torch.nn.Parameter(torch.zeros(10, 16))
    sparse.add_into(param, parts, 2.0)
    assert torch.equal(param.detach(), 2.0 * sparse_input())
    with pytest.raises(ValueError, match="contiguous"):
        sparse.add_into(torch.zeros(16, 10).t(), parts, 1.0)
    with pytest.raises(ValueError, match="floating"):
        sparse.add_into(torch.zeros(10, 16, dtype=torch.int32), parts, 1.0)


@pytest.mark.parametrize("name", ["sparse", "ternary", "dense", "lowrank"])
def test_check_parts_flags_wrong_shapes(name):
    tensor = ternary_input() if name == "ternary" else sparse_input()
    parts = encoded(name, tensor)
    codec_impl = get_codec(name)
    meta = {k: (tuple(v.shape), v.dtype) for k, v in parts.items()}
    assert codec_impl.check_parts(meta, (10, 16)) == []
    assert codec_impl.check_parts(meta, (10, 24)) != []
    missing = dict(meta)
    missing.pop(codec_impl.part_names[0])
    assert any("missing part" in p for p in codec_impl.check_parts(missing, (10, 16)))


@pytest.mark.parametrize("name", ["sparse", "sparse_ef"])
def test_sparse_entries_are_what_add_into_adds(name):
    """``entries`` (the worker's host cache keeps them) gives the kept indices and stored values; adding them
    as the codec does is bit-identical to add_into, and a count mismatch is refused the same way."""
    from deltaserve.experts.bitpack import add_at_indices

    tensor = sparse_input(shape=(12, 20), kept=17, seed=4)
    sparse = get_codec(name)
    parts = sparse.encode(tensor, value_dtype=torch.float16)
    index, values = sparse.entries(parts, tensor.numel())
    assert torch.equal(index, (tensor.reshape(-1) != 0).nonzero().squeeze(1)) and values.dtype == torch.float16
    target = torch.randn(12, 20)
    want = target.clone()
    sparse.add_into(want, parts, 0.3)
    add_at_indices(target.view(-1), index, values.float() * 0.3)
    assert torch.equal(target, want)
    bad = dict(parts, values=parts["values"][:-1])
    with pytest.raises(ValueError):
        sparse.entries(bad, tensor.numel())
