"""The sign codec (BitDelta): round trip, untouched rows stay zero, corrupt parts refused, add_into."""

import pytest
import torch

from deltaserve.experts import signs as sparsify
from deltaserve.experts.codecs import get_codec

SIGN = get_codec("sign")


def _tau(rows=12, cols=9, untouched=(2, 5, 11), seed=0):
    tau = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    tau[list(untouched)] = 0
    return tau


def test_bitdelta_is_sign_times_mean_abs_with_untouched_rows_kept_zero():
    tau = _tau()
    out = sparsify.bitdelta(tau)
    kept = tau.abs().sum(1) != 0
    scale = tau[kept].abs().mean()
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept]))
    torch.testing.assert_close(out[kept], torch.where(tau[kept] < 0, -scale, scale))
    # mean |tau| is the least-squares scale for fixed signs: a nudge either way is worse
    err = lambda s: float(((tau[kept] - s * torch.sign(tau[kept])) ** 2).sum())  # noqa: E731
    assert err(scale) < err(scale * 1.05) and err(scale) < err(scale * 0.95)


@pytest.mark.parametrize("shape", [(12, 9), (7,), (3, 4, 5)])
def test_sign_codec_round_trips_bitdelta_output_losslessly(shape):
    tau = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    if len(shape) > 1:
        tau[0] = 0
    approx = sparsify.bitdelta(tau)
    parts = SIGN.encode(approx)
    assert torch.equal(SIGN.decode(parts, shape, torch.float32), approx)
    assert SIGN.check_parts({k: (tuple(v.shape), v.dtype) for k, v in parts.items()}, shape) == []


def test_sign_codec_costs_about_one_bit_per_changed_entry():
    tau = _tau(rows=256, cols=64, untouched=range(128))
    parts = SIGN.encode(sparsify.bitdelta(tau))
    assert SIGN.nbytes(parts) == 256 // 8 + 128 * 64 // 8 + 4


def test_sign_codec_refuses_non_sign_input_and_corrupt_parts():
    with pytest.raises(ValueError, match="distinct magnitudes"):
        SIGN.encode(_tau())
    parts = SIGN.encode(sparsify.bitdelta(_tau()))
    with pytest.raises(ValueError, match="part 'sign'"):
        SIGN.decode({**parts, "sign": parts["sign"][:-1]}, (12, 9), torch.float32)
    with pytest.raises(ValueError, match="'scale'"):
        SIGN.decode({**parts, "scale": torch.tensor([float("nan")])}, (12, 9), torch.float32)
    with pytest.raises(ValueError, match="expects parts"):
        SIGN.decode({"rows": parts["rows"]}, (12, 9), torch.float32)
    assert SIGN.check_parts({k: (tuple(v.shape), v.dtype) for k, v in parts.items()}, (24, 9)) != []


@pytest.mark.parametrize("untouched", [(), (0, 3)])
def test_sign_codec_add_into_matches_decode(untouched):
    tau = sparsify.bitdelta(_tau(untouched=untouched))
    parts = SIGN.encode(tau)
    base = torch.randn(12, 9)
    target = base.clone()
    SIGN.add_into(target, parts, 0.5)
    torch.testing.assert_close(target, base + 0.5 * tau)


def test_bitdelta_compressor_stores_with_the_sign_codec(tmp_path):
    from deltaserve.experts.compress import compress_expert
    from deltaserve.experts.expert import load_expert
    from deltaserve.experts.taskvector import TaskVector

    deltas = {"a.weight": _tau(rows=64, cols=32), "b.weight": torch.randn(16)}
    tv = TaskVector(deltas=deltas, base_fingerprint="f" * 64, kind="full", source="test")
    manifest = compress_expert(tv, tmp_path / "e", name="e", method="bitdelta", progress=False)
    assert manifest.codec == "sign" and manifest.method["name"] == "bitdelta"
    assert manifest.bits_per_param < 1.1
    expert = load_expert(tmp_path / "e")
    torch.testing.assert_close(expert.decode("a.weight", torch.float32), sparsify.bitdelta(deltas["a.weight"]))
