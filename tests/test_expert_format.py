import json

import pytest
import torch

from deltaserve.experts.codecs import get_codec
from deltaserve.experts.expert import BaseMismatchError, ExpertFormatError, load_expert
from deltaserve.experts.save import EncodedDelta, save_expert

FINGERPRINT = "base-abc123"


def deltas(seed=0):
    """Two sparse deltas: 10x16 with 8 non-zeros and 4x8 with 3 non-zeros."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape, kept in (("layers.0.q.weight", (10, 16), 8), ("layers.0.k.weight", (4, 8), 3)):
        flat = torch.zeros(shape[0] * shape[1])
        flat[torch.randperm(flat.numel(), generator=gen)[:kept]] = torch.randn(kept, generator=gen)
        out[name] = flat.view(shape)
    return out


def save(directory, **overrides):
    kwargs = dict(name="math", base_fingerprint=FINGERPRINT, codec="sparse", source="zoo/math",
                  method={"name": "nps", "density": 0.05, "bands": 8}, value_dtype=torch.float16)
    payload = overrides.pop("deltas", None) or deltas()
    kwargs.update(overrides)
    return save_expert(directory, payload, **kwargs)


def test_round_trip_and_exact_accounting(tmp_path):
    manifest = save(tmp_path / "math", value_dtype=torch.float32, task="math", calibration_score=0.9)
    # bytes: (20 mask + 8*4 values) + (4 mask + 3*4 values)
    assert manifest.bytes == 20 + 32 + 4 + 12
    assert manifest.base_params == 160 + 32
    assert manifest.bits_per_param == pytest.approx(8 * 68 / 192)
    assert manifest.density == pytest.approx(11 / 192)
    assert manifest.rank is None and manifest.kind == "full"
    expert = load_expert(tmp_path / "math", verify=True)
    assert expert.manifest == manifest
    assert set(expert.param_names) == set(deltas())
    for name, delta in expert.iter_deltas():
        assert torch.equal(delta, deltas()[name])
    on_disk = json.loads((tmp_path / "math" / "manifest.json").read_text())
    assert on_disk["tensors"]["layers.0.q.weight"] == {"shape": [10, 16], "dtype": "float32"}


def test_fp16_bytes_match_brief_example(tmp_path):
    one = {"w": deltas()["layers.0.q.weight"]}
    manifest = save(tmp_path / "e", deltas=one)
    assert manifest.bytes == 36 and manifest.bits_per_param == pytest.approx(8 * 36 / 160)
    decoded = load_expert(tmp_path / "e").decode("w")
    torch.testing.assert_close(decoded, one["w"], rtol=1e-3, atol=0)


@pytest.mark.parametrize("target_dtype", [torch.float32, torch.bfloat16])
def test_add_into_through_expert(tmp_path, target_dtype):
    save(tmp_path / "e")
    expert = load_expert(tmp_path / "e")
    base = torch.randn(10, 16, generator=torch.Generator().manual_seed(3)).to(target_dtype)
    target = base.clone()
    expert.add_into("layers.0.q.weight", target, 0.5)
    reference = base.float() + 0.5 * expert.decode("layers.0.q.weight", torch.float32)
    tol = {torch.float32: 1e-6, torch.bfloat16: 1e-2}[target_dtype]
    torch.testing.assert_close(target.float(), reference, rtol=tol, atol=tol)
    assert not torch.equal(target, base)
    with pytest.raises(ValueError, match=r"shape \[4, 8\], expected \[10, 16\]"):
        expert.add_into("layers.0.q.weight", torch.zeros(4, 8), 1.0)


def test_ternary_lowrank_and_carried(tmp_path):
    tern = torch.tensor([[0.25, 0.0, -0.25], [0.0, 0.25, 0.0]])
    manifest = save(tmp_path / "t", deltas={"w": tern}, codec="ternary", carried={"head.weight": torch.ones(2, 3)})
    expert = load_expert(tmp_path / "t", verify=True)
    assert torch.equal(expert.decode("w"), tern)
    assert torch.equal(expert.carried["head.weight"], torch.ones(2, 3))
    assert manifest.carried == ["head.weight"] and manifest.carried_bytes == 24
    assert manifest.bytes == 1 + 1 + 4

    gen = torch.Generator().manual_seed(4)
    A, B = torch.randn(2, 6, generator=gen), torch.randn(5, 2, generator=gen)
    parts = get_codec("lowrank").encode_factors(A, B, value_dtype=torch.float32)
    manifest = save(tmp_path / "l", deltas={"w": EncodedDelta(parts, (5, 6))}, codec="lowrank", kind="lora",
                    method={"name": "lora"})
    assert manifest.rank == 2 and manifest.density is None and manifest.bytes == 4 * 22
    torch.testing.assert_close(load_expert(tmp_path / "l").decode("w"), B @ A)


def test_save_replaces_wholly_and_leaves_no_temp_dirs(tmp_path):
    save(tmp_path / "e", carried={"head": torch.zeros(2)})
    save(tmp_path / "e", deltas={"w": deltas()["layers.0.k.weight"]})
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["manifest.json", "tensors.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["e"]
    assert load_expert(tmp_path / "e").param_names == ("w",)


def test_failed_save_keeps_previous_expert(tmp_path):
    save(tmp_path / "e")
    bad = deltas()
    bad["layers.0.k.weight"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="'layers.0.k.weight'.*NaN or Inf"):
        save(tmp_path / "e", deltas=bad)
    load_expert(tmp_path / "e", verify=True)
    assert [p.name for p in tmp_path.iterdir()] == ["e"]


@pytest.mark.parametrize("name", ["../evil", "Upper", "", "a/b", "x" * 65])
def test_bad_names_rejected(tmp_path, name):
    with pytest.raises(ValueError, match="name"):
        save(tmp_path / "e", name=name)
    assert not (tmp_path / "e").exists()


def test_check_base(tmp_path):
    save(tmp_path / "e")
    expert = load_expert(tmp_path / "e")
    expert.check_base(FINGERPRINT, {"layers.0.q.weight": (10, 16), "layers.0.k.weight": [4, 8], "other": (1,)})
    with pytest.raises(BaseMismatchError, match="made for base 'base-abc123', not 'other'"):
        expert.check_base("other")
    with pytest.raises(BaseMismatchError, match=r"\[4, 9\] in the base"):
        expert.check_base(FINGERPRINT, {"layers.0.q.weight": (10, 16), "layers.0.k.weight": (4, 9)})


def _edit_manifest(directory, **changes):
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_corrupted_header_is_format_error(tmp_path):
    save(tmp_path / "e")
    path = tmp_path / "e" / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[9:13] = b"\xff\xfe\x00!"
    path.write_bytes(bytes(data))
    with pytest.raises(ExpertFormatError, match="tensors.safetensors: unreadable or corrupted"):
        load_expert(tmp_path / "e")


def test_truncated_file_is_format_error(tmp_path):
    save(tmp_path / "e")
    path = tmp_path / "e" / "tensors.safetensors"
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(ExpertFormatError, match="tensors.safetensors: .*not fully covered"):
        load_expert(tmp_path / "e")


def test_flipped_data_byte_caught_by_verify(tmp_path):
    save(tmp_path / "e")
    path = tmp_path / "e" / "tensors.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))
    load_expert(tmp_path / "e")  # headers are fine
    with pytest.raises(ExpertFormatError, match="does not match its sha256 digest"):
        load_expert(tmp_path / "e", verify=True)


def test_missing_files_are_format_errors(tmp_path):
    save(tmp_path / "e")
    (tmp_path / "e" / "tensors.safetensors").unlink()
    with pytest.raises(ExpertFormatError, match="tensors.safetensors: file is missing"):
        load_expert(tmp_path / "e")
    (tmp_path / "e" / "manifest.json").unlink()
    with pytest.raises(ExpertFormatError, match="manifest.json: manifest is missing"):
        load_expert(tmp_path / "e")
    with pytest.raises(ExpertFormatError, match="not an expert directory"):
        load_expert(tmp_path / "nowhere")


@pytest.mark.parametrize("changes,message", [
    ({"flavour": "x"}, "flavour: Extra inputs are not permitted"),
    ({"codec": "zip"}, "codec: Value error, unknown codec 'zip'; known codecs"),
    ({"name": "../x"}, "name: String should match pattern"),
    ({"format_version": 2}, "format_version"),
    ({"bytes": 1}, "bits_per_param"),
    ({"tensors": {"layers.0.q.weight": {"shape": [10, 16], "dtype": "float32"}}}, "base_params"),
])
def test_invalid_manifest_is_summarised(tmp_path, changes, message):
    save(tmp_path / "e")
    _edit_manifest(tmp_path / "e", **changes)
    with pytest.raises(ExpertFormatError, match=message):
        load_expert(tmp_path / "e")


def test_manifest_not_json(tmp_path):
    save(tmp_path / "e")
    (tmp_path / "e" / "manifest.json").write_bytes(b'{"name": "e",')
    with pytest.raises(ExpertFormatError, match="manifest.json: not valid JSON"):
        load_expert(tmp_path / "e")


def test_wrong_shape_in_manifest(tmp_path):
    save(tmp_path / "e", deltas={"w": deltas()["layers.0.q.weight"]})
    _edit_manifest(tmp_path / "e", tensors={"w": {"shape": [10, 24], "dtype": "float32"}}, base_params=240,
                   bits_per_param=8 * 36 / 240)
    with pytest.raises(ExpertFormatError, match=r"parameter 'w': part 'mask' is torch.uint8 \[20\], expected"):
        load_expert(tmp_path / "e")


def test_parts_missing_or_inconsistent(tmp_path):
    from safetensors.torch import load_file, save_file

    save(tmp_path / "e", deltas={"w": deltas()["layers.0.q.weight"]})
    path = tmp_path / "e" / "tensors.safetensors"
    stored = load_file(path)
    save_file({"w::mask": stored["w::mask"]}, path)
    with pytest.raises(ExpertFormatError, match="parameter 'w': missing part 'values'"):
        load_expert(tmp_path / "e")
    save_file({"w::mask": stored["w::mask"], "w::values": stored["w::values"][:7].clone()}, path)
    _edit_manifest(tmp_path / "e", bytes=34, bits_per_param=8 * 34 / 160, sha256={})
    expert = load_expert(tmp_path / "e")  # header-level shapes are plausible
    with pytest.raises(ExpertFormatError, match="parameter 'w': part 'values' has shape \\[7\\] but the mask keeps 8"):
        expert.decode("w")


def _lowrank(directory, scale):
    codec = get_codec("lowrank")
    A, B = torch.randn(2, 8) * scale, torch.randn(4, 2) * scale
    encoded = {"w": EncodedDelta(codec.encode_factors(A, B, value_dtype=torch.float32), (4, 8))}
    return save_expert(directory, encoded, name="lr", base_fingerprint=FINGERPRINT, codec="lowrank", source="t",
                       method={"name": "lora"}, value_dtype=torch.float32)


def test_verify_checks_lowrank_factors_without_the_dense_product(tmp_path, monkeypatch):
    """A registration verifies every expert; a LoRA's factors are checked as they are (the dense product of
    every adapted matrix made registration 7x slower) unless their product could overflow, which is decoded."""
    from deltaserve.experts.codecs.lowrank import LowRankCodec

    _lowrank(tmp_path / "ok", 1.0)
    _lowrank(tmp_path / "huge", 1e20)   # finite factors whose product is inf in float32

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded")
    with monkeypatch.context() as m:
        m.setattr(LowRankCodec, "decode", no_decode)
        load_expert(tmp_path / "ok", verify=True)
    load_expert(tmp_path / "huge")   # the headers are fine
    with pytest.raises(ExpertFormatError, match="'w' holds NaN or Inf"):
        load_expert(tmp_path / "huge", verify=True)
