"""Sign-valued sparse experts: the ``sign_ef`` codec (Elias–Fano positions, one sign bit per kept entry, one
scale) and ``values="sign"`` on the sparse compressors (magnitude, DARE, Breadcrumbs, NPS)."""

import math

import pytest
import torch

from deltaserve.experts import signs, sparsify
from deltaserve.experts.codecs import get_codec
from deltaserve.experts.codecs.sparse_ef import index_part_bytes

SIGN_EF = get_codec("sign_ef")


def _sparse_signs(shape=(64, 48), density=0.01, seed=0):
    tau = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return tau, signs.sign_valued(sparsify.magnitude(tau, density))


def _meta(parts):
    return {k: (tuple(v.shape), v.dtype) for k, v in parts.items()}


def test_sign_valued_is_sign_times_mean_abs_of_the_kept_entries():
    tau, out = _sparse_signs()
    kept = sparsify.magnitude(tau, 0.01) != 0
    scale = tau[kept].abs().mean()
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    torch.testing.assert_close(out[kept], torch.sign(tau[kept]) * scale)
    err = lambda s: float(((tau[kept] - s * torch.sign(tau[kept])) ** 2).sum())  # noqa: E731
    assert err(scale) < err(scale * 1.05) and err(scale) < err(scale * 0.95)   # least squares for fixed signs
    assert torch.equal(signs.sign_valued(torch.zeros(3, 3)), torch.zeros(3, 3))


@pytest.mark.parametrize("shape,density", [((64, 48), 0.01), ((7,), 0.5), ((3, 4, 5), 0.2), ((9, 9), None)])
def test_round_trip_add_into_and_header_checks(shape, density):
    approx = torch.zeros(shape) if density is None else _sparse_signs(shape, density)[1]
    parts = SIGN_EF.encode(approx)
    assert torch.equal(SIGN_EF.decode(parts, shape, torch.float32), approx)
    base = torch.randn(*shape)
    target = base.clone()
    SIGN_EF.add_into(target, parts, -0.5)
    torch.testing.assert_close(target, base - 0.5 * approx)
    index, values = SIGN_EF.entries(parts, math.prod(shape))
    assert torch.equal(approx.reshape(-1)[index], values)
    assert SIGN_EF.check_parts(_meta(parts), shape) == [] and SIGN_EF.kept_count(parts) == int((approx != 0).sum())


def test_bytes_are_positions_plus_one_bit_per_kept_entry():
    tau = torch.randn(512, 512, generator=torch.Generator().manual_seed(2))
    approx = signs.sign_valued(sparsify.magnitude(tau, 0.0025))
    parts = SIGN_EF.encode(approx)
    kept = int((approx != 0).sum())
    assert SIGN_EF.nbytes(parts) == sum(index_part_bytes(tau.numel(), kept).values()) + math.ceil(kept / 8) + 12
    assert 8 * SIGN_EF.nbytes(parts) / tau.numel() < 0.03                # 0.25 % kept: under 0.03 bits/param
    exact = get_codec("sparse_ef").encode(sparsify.magnitude(tau, 0.0025))
    assert SIGN_EF.nbytes(parts) < 0.5 * get_codec("sparse_ef").nbytes(exact)


def test_refuses_non_sign_input_and_corrupt_parts():
    tau, approx = _sparse_signs()
    with pytest.raises(ValueError, match="distinct magnitudes"):
        SIGN_EF.encode(sparsify.magnitude(tau, 0.01))
    parts = SIGN_EF.encode(approx)
    shape = tuple(tau.shape)
    for change, message in (({"sign": parts["sign"][:-1]}, "part 'sign'"),
                            ({"scale": torch.tensor([float("inf")])}, "'scale'"),
                            ({"kept": torch.tensor([10**9])}, "'kept'"),
                            ({"kept": parts["kept"] - 1}, "index_low|index_high|part .sign."),
                            ({"index_low": parts["index_low"][:-1]}, "index_low")):
        with pytest.raises(ValueError, match=message):
            SIGN_EF.decode({**parts, **change}, shape, torch.float32)
    with pytest.raises(ValueError, match="expects parts"):
        SIGN_EF.decode({"sign": parts["sign"]}, shape, torch.float32)
    assert SIGN_EF.check_parts(_meta({**parts, "index_high": parts["index_high"][:-1]}), shape) != []
    assert SIGN_EF.check_parts(_meta({**parts, "kept": parts["kept"].int()}), shape) != []
    assert SIGN_EF.check_parts(_meta(parts), (4096, 48)) != []


@pytest.mark.parametrize("method,options", [("magnitude", {}), ("dare", {"seed": 3}), ("breadcrumbs", {})])
def test_sparse_compressors_store_sign_values_with_sign_ef(tmp_path, method, options):
    from deltaserve.experts.compress import compress_expert
    from deltaserve.experts.expert import load_expert
    from deltaserve.experts.taskvector import TaskVector

    deltas = {"a.weight": torch.randn(128, 64, generator=torch.Generator().manual_seed(4)), "b.weight": torch.randn(16)}
    tv = TaskVector(deltas=deltas, base_fingerprint="f" * 64, kind="full", source="test")
    exact = compress_expert(tv, tmp_path / "exact", name="exact", method=method, density=0.01, progress=False,
                            **options)
    signed = compress_expert(tv, tmp_path / "sign", name="sign", method=method, density=0.01, values="sign",
                             progress=False, **options)
    assert signed.codec == "sign_ef" and signed.method["values"] == "sign" and exact.codec != "sign_ef"
    assert signed.bytes < exact.bytes
    kept = load_expert(tmp_path / "exact").decode("a.weight", torch.float32)
    got = load_expert(tmp_path / "sign").decode("a.weight", torch.float32)
    torch.testing.assert_close(got, signs.sign_valued(kept), rtol=2e-3, atol=1e-6)   # same support, ±mean |kept|
