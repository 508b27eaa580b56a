"""The Elias–Fano sparse codec (experts.codecs.sparse_ef): exact layout against a slow reference,
lossless round trips against the bitmask ``sparse`` codec, corrupt input, the expert format."""

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from deltaserve.experts.bitpack import pack_bits, pack_uints, unpack_uints
from deltaserve.experts.codecs.sparse_ef import NAME, high_bit_count, index_part_bytes, low_bits, sparse_codec_for
from deltaserve.experts.codecs import CODECS, get_codec
from deltaserve.experts.expert import ExpertFormatError, load_expert
from deltaserve.experts.save import save_expert

EF, SPARSE = get_codec(NAME), get_codec("sparse")
# Tolerance of one add_into against the compute-dtype reference, per target dtype (as tests/test_codecs.py).
ADD_TOL = {torch.float32: {"rtol": 1e-6, "atol": 1e-7}, torch.float64: {"rtol": 1e-12, "atol": 1e-12},
           torch.bfloat16: {"rtol": 1e-2, "atol": 1e-2}, torch.float16: {"rtol": 1e-3, "atol": 1e-3}}


def sparse_tensor(shape, index, seed=0, value_dtype=torch.float32):
    """Zeros with random non-zero values (representable in ``value_dtype``) at flat ``index``."""
    gen = torch.Generator().manual_seed(seed)
    flat = torch.zeros(math.prod(shape))
    index = torch.as_tensor(index, dtype=torch.int64)
    values = torch.randn(index.numel(), generator=gen).to(value_dtype).float()
    flat[index] = torch.where(values == 0, torch.ones_like(values), values)
    return flat.view(shape)


def random_index(numel, kept, seed):
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:kept].sort().values


def reference_parts(index: list[int], numel: int) -> tuple[np.ndarray, np.ndarray]:
    """Slow, readable Elias–Fano of sorted ``index``: low width = the largest l with kept * 2**l <= numel."""
    kept = len(index)
    if kept == 0:
        return np.zeros(0, np.uint8), np.zeros(0, np.uint8)
    low = max(width for width in range(64) if kept << width <= numel)
    high = ["0"] * (kept + ((numel - 1) >> low))
    for i, x in enumerate(index):
        high[(x >> low) + i] = "1"
    lows = "".join(format(x % (1 << low), f"0{low}b") if low else "" for x in index)
    return packed_bit_string("".join(high)), packed_bit_string(lows)


def packed_bit_string(bits: str) -> np.ndarray:
    return np.packbits(np.array([int(c) for c in bits], dtype=np.uint8))


CASES = [  # (shape, flat index of the kept entries)
    ((10, 16), []),                                   # nothing kept
    ((0, 5), []),                                     # an empty parameter
    ((10, 16), list(range(160))),                     # everything kept (low width 0)
    ((1,), [0]),                                      # one parameter
    ((7,), [6]),                                      # a single entry, at the last position
    ((3, 5, 7), [0, 104]),                            # the very first and last positions
    ((70_001,), [0, 70_000]),                         # a gap wider than 16 bits
    ((1 << 17,), [(1 << 17) - 1]),                    # one entry, 2**17 - 1 positions skipped
    ((64,), list(range(0, 64, 2))),                   # every other entry
]


@pytest.mark.parametrize("shape,index", CASES)
def test_layout_matches_slow_reference_on_edge_cases(shape, index):
    parts = EF.encode(sparse_tensor(shape, index), value_dtype=torch.float32)
    high, low = reference_parts(index, math.prod(shape))
    np.testing.assert_array_equal(parts["index_high"].numpy(), high)
    np.testing.assert_array_equal(parts["index_low"].numpy(), low)
    assert EF.kept_count(parts) == len(index)
    assert torch.equal(EF.decode(parts, shape, torch.float32), sparse_tensor(shape, index))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.5, 0.97])
def test_layout_matches_slow_reference_random(seed, density):
    numel = [3000, 4097, 12_345, 65_536][seed]
    index = random_index(numel, max(1, round(density * numel)), seed)
    parts = EF.encode(sparse_tensor((numel,), index, seed), value_dtype=torch.float16)
    high, low = reference_parts(index.tolist(), numel)
    np.testing.assert_array_equal(parts["index_high"].numpy(), high)
    np.testing.assert_array_equal(parts["index_low"].numpy(), low)


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_lossless_round_trip_equals_bitmask_codec(value_dtype, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    for shape in [(1,), (5, 3), (33, 65), (4, 8, 16), (2048,)]:
        numel = math.prod(shape)
        for kept in {0, 1, numel, max(1, numel // 100), int(torch.randint(numel + 1, (1,), generator=gen))}:
            tensor = sparse_tensor(shape, random_index(numel, kept, seed), seed, value_dtype)
            parts = EF.encode(tensor, value_dtype=value_dtype)
            oracle = SPARSE.encode(tensor, value_dtype=value_dtype)
            assert EF.kept_count(parts) == SPARSE.kept_count(oracle) == kept
            assert torch.equal(parts["values"], oracle["values"])
            for dtype in (torch.float32, torch.float64, value_dtype):
                decoded = EF.decode(parts, shape, dtype)
                assert decoded.dtype == dtype and decoded.shape == shape
                assert torch.equal(decoded, tensor.to(dtype))
            assert EF.nbytes(parts) == sum(index_part_bytes(numel, kept).values()) + kept * value_dtype.itemsize


def test_bytes_fall_with_density_and_beat_the_bitmask():
    numel = 1 << 18
    for density, at_most in [(0.001, 0.03), (0.01, 0.25), (0.1, 2.15)]:
        tensor = sparse_tensor((numel,), random_index(numel, round(density * numel), 1))
        ef_bits = 8 * EF.nbytes(EF.encode(tensor)) / numel
        sparse_bits = 8 * SPARSE.nbytes(SPARSE.encode(tensor)) / numel
        assert ef_bits <= at_most < sparse_bits
        assert EF.nbytes(EF.encode(tensor)) == 2 * round(density * numel) + sum(
            index_part_bytes(numel, round(density * numel)).values())


def test_layout_sizes():
    assert low_bits(160, 0) == 0 and high_bit_count(160, 0) == 0
    assert low_bits(160, 160) == 0 and high_bit_count(160, 160) == 160 + 159
    assert low_bits(10_000, 100) == 6 and high_bit_count(10_000, 100) == 100 + (9_999 >> 6)
    assert index_part_bytes(10_000, 100) == {"index_high": math.ceil(256 / 8), "index_low": 75}


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_add_into_matches_reference_and_changes_target(target_dtype):
    tensor = sparse_tensor((33, 65), random_index(33 * 65, 200, 3), 3)
    parts = EF.encode(tensor)
    base = torch.randn(33, 65, generator=torch.Generator().manual_seed(4)).to(target_dtype)
    target, weight = base.clone(), -0.7
    EF.add_into(target, parts, weight)
    compute = torch.float64 if target_dtype == torch.float64 else torch.float32
    reference = (base.to(compute) + weight * EF.decode(parts, base.shape, compute)).to(target_dtype)
    torch.testing.assert_close(target, reference, **ADD_TOL[target_dtype])
    assert not torch.equal(target, base)
    same_as_bitmask = base.clone()
    SPARSE.add_into(same_as_bitmask, SPARSE.encode(tensor), weight)
    assert torch.equal(target, same_as_bitmask)


def test_add_into_parameter_empty_parts_and_bad_targets():
    tensor = sparse_tensor((10, 16), [0, 17, 159])
    parts = EF.encode(tensor, value_dtype=torch.float32)
    param = torch.nn.Parameter(torch.zeros(10, 16))
    EF.add_into(param, parts, 2.0)
    assert torch.equal(param.detach(), 2.0 * tensor)
    base = torch.randn(10, 16)
    target = base.clone()
    EF.add_into(target, EF.encode(torch.zeros(10, 16)), 1.0)
    assert torch.equal(target, base)
    with pytest.raises(ValueError, match="contiguous"):
        EF.add_into(torch.zeros(16, 10).t(), parts, 1.0)
    with pytest.raises(ValueError, match="floating"):
        EF.add_into(torch.zeros(10, 16, dtype=torch.int32), parts, 1.0)


# ------------------------------------------------------------------- corrupt input


def parts_for(numel, index, low_values=None):
    """Hand-made parts: the code of ``index``, with the low fields replaced by ``low_values`` if given."""
    parts = EF.encode(sparse_tensor((numel,), index), value_dtype=torch.float32)
    if low_values is not None:
        parts["index_low"] = pack_uints(torch.tensor(low_values), low_bits(numel, len(index)))
    return parts


def with_bits(packed, set_bits=(), clear_bits=()):
    bits = np.unpackbits(packed.numpy())
    bits[list(set_bits)], bits[list(clear_bits)] = 1, 0
    return torch.from_numpy(np.packbits(bits))


BASE = parts_for(64, [3, 7, 40])  # low width 4; index_high: 3 + (63 >> 4) = 6 bits, 1s at 0, 1, 4
SIZE = "for 3 kept entries of 64 parameters"
HIGH, LOW, VALUES = BASE["index_high"], BASE["index_low"], BASE["values"]
CORRUPT = [  # (what, replaced parts, message)
    ("truncated index_high", {"index_high": HIGH[:0]},
     rf"'index_high' is torch.uint8 \[0\], expected uint8 \[1\] {SIZE}"),
    ("truncated index_low", {"index_low": LOW[:1]}, rf"'index_low' is torch.uint8 \[1\], expected uint8 \[2\] {SIZE}"),
    ("longer index_low", {"index_low": LOW.repeat(2)}, r"'index_low' is torch.uint8 \[4\], expected uint8 \[2\]"),
    ("index_high not uint8", {"index_high": HIGH.to(torch.int8)}, r"'index_high' is torch.int8 \[1\], expected uint8"),
    ("index_low 2-D", {"index_low": LOW.view(1, -1)}, r"'index_low' is torch.uint8 \[1, 2\], expected uint8 \[2\]"),
    ("extra high bit", {"index_high": with_bits(HIGH, [5])}, r"'index_high' codes 4 entries but part 'values' holds 3"),
    ("high padding bit", {"index_high": with_bits(HIGH, [7], [4])}, r"'index_high' has a 1 in its padding \(bit 7, 6 "),
    ("low padding bit", {"index_low": with_bits(LOW, [15])}, r"'index_low' has non-zero padding bits after field 3"),
    ("fewer values", {"values": VALUES[:2]}, r"part 'index_high' codes 3 entries but part 'values' holds 2"),
    ("values not float", {"values": VALUES.to(torch.int32)}, r"part 'values' is torch.int32 \[3\], expected 1-D"),
    ("values 2-D", {"values": VALUES.view(3, 1)}, r"part 'values' is torch.float32 \[3, 1\]"),
    ("decreasing", {"index_low": pack_uints(torch.tensor([7, 3, 8]), 4)},
     r"not strictly increasing \(entry 1: 3 after 7"),
    ("duplicate", {"index_low": pack_uints(torch.tensor([7, 7, 8]), 4)},
     r"not strictly increasing \(entry 1: 7 after 7"),
]


@pytest.mark.parametrize("what,change,message", CORRUPT, ids=[c[0] for c in CORRUPT])
def test_corrupt_parts_rejected_naming_the_part(what, change, message):
    parts = {**BASE, **change}
    with pytest.raises(ValueError, match=message):
        EF.decode(parts, (64,), torch.float32)
    target = torch.randn(64)
    before = target.clone()
    with pytest.raises(ValueError, match=message):
        EF.add_into(target, parts, 1.0)
    assert torch.equal(target, before)  # checked before anything is written


def test_out_of_range_and_missing_parts_rejected():
    # 40 parameters, 2 kept: low width 4, last bucket 32..47 of which only 32..39 exist.
    with pytest.raises(ValueError, match=r"decode to index 47, out of range for 40 parameters"):
        EF.decode(parts_for(40, [3, 33], low_values=[3, 15]), (40,), torch.float32)
    with pytest.raises(ValueError, match=r"expects parts .*missing \['index_low'\]"):
        EF.decode({k: v for k, v in BASE.items() if k != "index_low"}, (64,), torch.float32)
    with pytest.raises(ValueError, match=r"unexpected \['mask'\]"):
        EF.decode({**BASE, "mask": pack_bits(torch.ones(64, dtype=torch.bool))}, (64,), torch.float32)
    with pytest.raises(ValueError, match=r"part 'values' holds 3 entries for 2 parameters"):
        EF.decode(BASE, (2,), torch.float32)
    with pytest.raises(ValueError, match=r"'index_low' is torch.uint8 \[2\], expected uint8 \[4\] for 3 kept "
                                         r"entries of 4096 parameters"):
        EF.decode(BASE, (4096,), torch.float32)  # the parameter's size disagrees with the code


def test_check_parts_from_metadata_alone():
    meta = {k: (tuple(v.shape), v.dtype) for k, v in BASE.items()}
    assert EF.check_parts(meta, (64,)) == []
    assert EF.check_parts(meta, (8, 8)) == []
    assert EF.check_parts(meta, (2,)) == ["part 'values' holds 3 entries for 2 parameters"]
    wrong = EF.check_parts({**meta, "index_low": ((1,), torch.uint8)}, (64,))
    assert wrong == [f"part 'index_low' is torch.uint8 [1], expected uint8 [2] {SIZE}"]
    assert EF.check_parts(meta, (4096,)) == [
        "part 'index_low' is torch.uint8 [2], expected uint8 [4] for 3 kept entries of 4096 parameters"]
    assert EF.check_parts({**meta, "values": ((3,), torch.int8)}, (64,))[0].startswith("part 'values' is torch.int8")
    assert EF.check_parts({"values": meta["values"]}, (64,)) == ["missing part 'index_high'",
                                                                 "missing part 'index_low'"]
    unknown_dtype = EF.check_parts({**meta, "index_high": ((1,), "F8_E4M3")}, (64,))
    assert unknown_dtype[0].startswith("part 'index_high' is F8_E4M3 [1]")


def test_encode_rejects_bad_value_dtype_and_nan():
    with pytest.raises(ValueError, match="value_dtype"):
        EF.encode(torch.zeros(4), value_dtype=torch.int8)
    with pytest.raises(ValueError, match="sparse_ef codec got a tensor with NaN"):
        EF.encode(torch.tensor([0.0, float("nan")]))


# ------------------------------------------------------------------- expert format


def save(directory, deltas):
    return save_expert(directory, deltas, name="e", base_fingerprint="base", codec=NAME, source="test",
                       method={"name": "magnitude", "density": 0.01}, value_dtype=torch.float32)


def expert_deltas():
    return {"a": sparse_tensor((40, 50), random_index(2000, 20, 5), 5), "b": sparse_tensor((7,), [6], 6),
            "c": torch.zeros(3, 4)}


def test_expert_round_trip_bytes_and_density(tmp_path):
    manifest = save(tmp_path / "e", expert_deltas())
    assert manifest.codec == NAME and manifest.density == pytest.approx(21 / 2019)
    assert manifest.bytes == sum(sum(index_part_bytes(n, k).values()) + 4 * k for n, k in [(2000, 20), (7, 1), (12, 0)])
    expert = load_expert(tmp_path / "e", verify=True)
    for name, delta in expert.iter_deltas():
        assert torch.equal(delta, expert_deltas()[name])
    target = torch.zeros(40, 50)
    expert.add_into("a", target, 0.5)
    assert torch.equal(target, 0.5 * expert_deltas()["a"])


def rewrite_part(directory, key, tensor, fix_digest=True):
    path = directory / "tensors.safetensors"
    stored = load_file(path)
    stored[key] = tensor
    save_file(stored, path, metadata={"format": "pt"})
    if fix_digest:
        manifest_path = directory / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["sha256"]["tensors.safetensors"] = hashlib.sha256(path.read_bytes()).hexdigest()
        manifest_path.write_text(json.dumps(manifest))


def test_corrupt_index_content_caught_by_verify(tmp_path):
    save(tmp_path / "e", expert_deltas())
    stored = load_file(tmp_path / "e" / "tensors.safetensors")["a::index_high"]
    rewrite_part(tmp_path / "e", "a::index_high", torch.zeros_like(stored))  # same size, digest updated
    load_expert(tmp_path / "e")  # headers are consistent
    with pytest.raises(ExpertFormatError, match=r"parameter 'a': part 'index_high' codes 0 entries"):
        load_expert(tmp_path / "e", verify=True)


def test_flipped_index_byte_caught_by_digest(tmp_path):
    save(tmp_path / "e", expert_deltas())
    stored = load_file(tmp_path / "e" / "tensors.safetensors")["a::index_low"]
    rewrite_part(tmp_path / "e", "a::index_low", stored ^ 1, fix_digest=False)
    with pytest.raises(ExpertFormatError, match="sha256"):
        load_expert(tmp_path / "e", verify=True)


def test_truncated_index_part_caught_from_headers(tmp_path):
    save(tmp_path / "e", expert_deltas())
    stored = load_file(tmp_path / "e" / "tensors.safetensors")["a::index_low"]
    rewrite_part(tmp_path / "e", "a::index_low", stored[:-1])
    with pytest.raises(ExpertFormatError, match=r"parameter 'a': part 'index_low' is torch.uint8 \[\d+\], expected"):
        load_expert(tmp_path / "e")


# ------------------------------------------------------------------- helpers


def test_registered_once_and_codec_choice():
    assert NAME in CODECS and CODECS[NAME] is EF and EF.part_names == ("index_high", "index_low", "values")
    assert [sparse_codec_for(d) for d in (0.0, 0.001, 0.01, 0.1, 0.2)] == [NAME] * 5
    assert [sparse_codec_for(d) for d in (0.3, 0.5, 1.0)] == ["sparse"] * 3
    with pytest.raises(ValueError, match="density must be in"):
        sparse_codec_for(1.5)


@pytest.mark.parametrize("width", [0, 1, 3, 6, 8, 9, 17, 33, 48])
def test_uint_fields_match_numpy_bits(width):
    gen = torch.Generator().manual_seed(width)
    for count in (0, 1, 7, 100):
        values = torch.randint(0, 1 << width, (count,), generator=gen)
        bits = "".join(format(v, f"0{width}b") if width else "" for v in values.tolist())
        np.testing.assert_array_equal(pack_uints(values, width).numpy(), packed_bit_string(bits))
        assert torch.equal(unpack_uints(pack_uints(values, width), count, width, part="p"), values)
    with pytest.raises(ValueError, match="width must be in"):
        pack_uints(torch.zeros(1, dtype=torch.int64), 49)
    with pytest.raises(ValueError, match=r"values must lie in \[0, 2\*\*3\)"):
        pack_uints(torch.tensor([8]), 3)
