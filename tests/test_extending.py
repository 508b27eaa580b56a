"""A new codec and a new merge method are each one new file: a module dropped into the family's package is
found by its registry (no list to edit, no other file touched) and works everywhere the family is used."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

from deltaserve.experts import codecs
from deltaserve.experts.codecs import CODECS
from deltaserve.experts.merge import MERGE_METHODS
from deltaserve.experts.merge import methods as merge_methods

CODEC_FILE = '''
"""A throwaway codec: the whole tensor as float16 values and one float32 scale."""
import torch

from deltaserve.experts.bitpack import parts_nbytes
from deltaserve.experts.codecs.base import codec


@codec("scaled_half")
class ScaledHalfCodec:
    part_names = ("values", "scale")

    def encode(self, tensor, *, value_dtype=torch.float16):
        scale = tensor.abs().max().clamp(min=1e-12).float().reshape(1)
        return {"values": (tensor / scale).to(torch.float16), "scale": scale}

    def decode(self, parts, shape, dtype):
        return (parts["values"].float() * parts["scale"]).reshape(tuple(shape)).to(dtype)

    def add_into(self, target, parts, weight):
        target.copy_((target.float() + weight * self.decode(parts, target.shape, torch.float32)).to(target.dtype))

    def nbytes(self, parts):
        return parts_nbytes(parts)

    def check_parts(self, part_meta, shape):
        return [] if part_meta["values"][0] == tuple(shape) else ["values has the wrong shape"]

    def kept_count(self, parts):
        return None

    def rank(self, parts):
        return None
'''

METHOD_FILE = '''
"""A throwaway merge method: the weighted mean of the task vectors."""
from deltaserve.experts.merge.inputs import stacked
from deltaserve.experts.merge.registry import merge_method


@merge_method("weighted_mean")
def weighted_mean(deltas, weights, *, floor: float = 0.0):
    """Weighted mean: sum_i w_i tau_i / sum_i w_i, entries below ``floor`` in magnitude dropped."""
    stack, w = stacked(deltas, weights)
    merged = (stack * w).sum(dim=0) / w.sum()
    return merged * (merged.abs() >= floor)
'''


@pytest.fixture
def dropped_in(tmp_path, monkeypatch):
    """``dropped_in(package, registry, name, source)``: the module as a new file of ``package`` (its folder
    extended by a temp one), found by ``registry``; removed again after the test."""
    added = []

    def drop(package, registry, name, source):
        before = set(registry)
        folder = tmp_path / package.__name__.rsplit(".", 1)[-1]
        folder.mkdir(exist_ok=True)
        (folder / f"{name}.py").write_text(source)
        monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
        registry.rediscover()
        added.append((registry, set(registry) - before, f"{package.__name__}.{name}"))
        return set(registry) - before

    yield drop
    for registry, names, module in added:
        for name in names:
            registry.unregister(name)
        sys.modules.pop(module, None)


def test_a_new_codec_is_one_new_file(dropped_in, tmp_path):
    from deltaserve.experts.expert import load_expert
    from deltaserve.experts.save import save_expert
    from deltaserve.server.commands.methods import families_markdown

    assert dropped_in(codecs, CODECS, "scaled_half", CODEC_FILE) == {"scaled_half"}
    tau = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    save_expert(tmp_path / "e", {"w": tau}, name="e", base_fingerprint="base", codec="scaled_half", source="test",
                method={"name": "dense"})
    expert = load_expert(tmp_path / "e", verify=True)
    assert expert.manifest.codec == "scaled_half" and not expert.manifest.lowrank
    torch.testing.assert_close(expert.decode("w", torch.float32), tau, rtol=1e-3, atol=1e-3)
    target = torch.zeros(6, 8)
    expert.add_into("w", target, 0.5)
    torch.testing.assert_close(target, 0.5 * tau, rtol=1e-3, atol=1e-3)
    assert "`scaled_half`" in families_markdown()


def test_a_new_merge_method_is_one_new_file(dropped_in):
    from deltaserve.experts.merge.checkpoint import merged_params
    from deltaserve.server.recipes import parse_model

    assert dropped_in(merge_methods, MERGE_METHODS, "weighted_mean", METHOD_FILE) == {"weighted_mean"}
    recipe = parse_model("weighted_mean(floor=0.5):0.25*a+0.75*b", base_name="base", experts={"a", "b"})
    assert recipe.method == "weighted_mean" and recipe.option_dict == {"floor": 0.5}
    deltas = {0: torch.tensor([1.0, 2.0, 0.0]), 1: torch.tensor([1.0, 0.0, 0.4])}
    base = {"w": torch.zeros(3)}
    ((name, merged),) = merged_params(["w"], base, lambda i, n: deltas[i], 2, recipe.method, list(recipe.weights),
                                      options=recipe.option_dict)
    torch.testing.assert_close(merged, torch.tensor([1.0, 0.5, 0.0]))     # 0.3 is below the floor
    with pytest.raises(Exception, match="floor"):
        parse_model("weighted_mean(floor=x):a+b", base_name="base", experts={"a", "b"})
    parser = importlib.import_module("deltaserve.server.cli").build_parser()
    merge_help = parser._subparsers._group_actions[0].choices["merge"].format_help()
    assert "weighted_mean" in merge_help and "--floor" in merge_help
