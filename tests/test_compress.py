import pytest
import torch

from deltaserve.experts.compress import COMPRESSORS, compress_expert, extract, get_compressor
from deltaserve.experts.expert import load_expert
from deltaserve.experts.taskvector import load_state_dict


@pytest.fixture(scope="module")
def tv(micro_zoo):
    return extract(micro_zoo.layout.base, finetuned_dir=micro_zoo.layout.full("upper"))


@pytest.mark.parametrize("method", ["magnitude", "dare", "breadcrumbs", "tswitch"])
def test_sparse_methods_write_loadable_experts_at_the_requested_density(tv, tmp_path, method):
    manifest = compress_expert(tv, tmp_path / method, name=method, method=method, density=0.1, task="upper")
    expert = load_expert(tmp_path / method, verify=True)
    assert expert.manifest == manifest
    expected = get_compressor(method).codec
    assert manifest.codec == ("sparse_ef" if expected == "sparse" else expected)   # positions coded at 10 %
    assert manifest.kind == "full" and manifest.task == "upper"
    tolerance = 0.03 if method in ("dare", "breadcrumbs") else 0.002  # random / outlier-dropping methods
    assert abs(manifest.density - 0.1) < tolerance
    assert manifest.bits_per_param < 16 * 0.5  # far below fp16 dense
    name = "model.layers.0.mlp.down_proj.weight"
    decoded = expert.decode(name)
    assert decoded.shape == tv.deltas[name].shape and decoded.abs().sum() > 0


def test_sparse_experts_take_the_smaller_sparse_codec_at_their_density(tv, tmp_path):
    dense = compress_expert(tv, tmp_path / "d", name="d", method="magnitude", density=0.5)
    thin = compress_expert(tv, tmp_path / "t", name="t", method="magnitude", density=0.01)
    assert dense.codec == "sparse" and thin.codec == "sparse_ef"
    assert thin.bits_per_param < 0.3 * 1.16      # the bitmask alone would cost 1 bit/param


def test_magnitude_expert_keeps_the_largest_entries(tv, tmp_path):
    compress_expert(tv, tmp_path / "m", name="m", method="magnitude", density=0.05, value_dtype=torch.float32)
    expert = load_expert(tmp_path / "m")
    name = "model.layers.1.self_attn.q_proj.weight"
    decoded, tau = expert.decode(name), tv.deltas[name]
    kept = decoded != 0
    assert torch.equal(decoded[kept], tau[kept])  # fp32 values stored losslessly
    assert tau[kept].abs().min() >= tau[~kept].abs().max()


def test_lowrank_expert_reconstructs_a_lora_exactly(micro_zoo, tmp_path):
    tv = extract(micro_zoo.layout.base, adapter_dir=micro_zoo.layout.lora("upper"))
    compress_expert(tv, tmp_path / "lr", name="lr", method="lowrank", rank=8, value_dtype=torch.float32)
    expert = load_expert(tmp_path / "lr")
    assert expert.manifest.rank == 8 and expert.manifest.kind == "lora"
    for name, delta in tv.deltas.items():
        # a rank-8 matrix re-factored by a float32 SVD: exact up to SVD round-off
        error = torch.linalg.norm(expert.decode(name) - delta) / torch.linalg.norm(delta)
        assert error < 1e-5, (name, float(error))


def test_dense_expert_round_trips_and_adds_into_base(tv, micro_zoo, tmp_path):
    compress_expert(tv, tmp_path / "d", name="d", method="dense", value_dtype=torch.float32)
    expert = load_expert(tmp_path / "d")
    base, tuned = load_state_dict(micro_zoo.layout.base), load_state_dict(micro_zoo.layout.full("upper"))
    for name in expert.param_names:
        target = base[name].clone()
        expert.add_into(name, target, 1.0)
        torch.testing.assert_close(target, tuned[name], rtol=0, atol=1e-6)


def test_nps_needs_an_objective_and_unknown_methods_list_the_known(tv, tmp_path):
    with pytest.raises(ValueError, match="objective"):
        compress_expert(tv, tmp_path / "n", name="n", method="nps")
    with pytest.raises(KeyError, match="known"):
        compress_expert(tv, tmp_path / "x", name="x", method="zip")
    assert set(COMPRESSORS) == {"dense", "magnitude", "dare", "breadcrumbs", "tswitch", "bitdelta", "lowrank", "nps",
                                "sparse_ft"}


def test_options_are_checked_against_the_methods_model(tv, tmp_path):
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rank'\] for compression method 'magnitude'; "
                                         r"valid options: \['density', 'values'\]"):
        compress_expert(tv, tmp_path / "m", name="m", method="magnitude", rank=4)
    with pytest.raises(ValueError, match="density: Input should be less than or equal to 1"):
        compress_expert(tv, tmp_path / "m", name="m", method="magnitude", density=1.5)
    assert not (tmp_path / "m").exists()


def test_unchanged_parameters_are_left_out(tv, tmp_path):
    import dataclasses

    deltas = dict(tv.deltas)
    untouched = "model.layers.0.mlp.down_proj.weight"
    deltas[untouched] = torch.zeros_like(deltas[untouched])
    zeroed = dataclasses.replace(tv, deltas=deltas)
    manifest = compress_expert(zeroed, tmp_path / "m", name="m", method="magnitude", density=0.05)
    assert untouched not in manifest.tensors and len(manifest.tensors) == len(tv.deltas) - 1
    empty = dataclasses.replace(tv, deltas={n: torch.zeros_like(t) for n, t in tv.deltas.items()})
    with pytest.raises(ValueError, match="zero everywhere"):
        compress_expert(empty, tmp_path / "e", name="e", method="magnitude")


def test_nps_on_a_zoo_task_records_its_search(micro_zoo, tmp_path):
    from deltaserve_zoo.build import load_llama
    from deltaserve_zoo.evaluate import TaskEvaluator, task_vector_objective

    layout = micro_zoo.layout
    tv = extract(layout.base, finetuned_dir=layout.full("length"))
    evaluator = TaskEvaluator(micro_zoo.tokenizer, ["length"], "calib", 16)
    objective = task_vector_objective(load_llama(layout.base), evaluator, "length")
    manifest = compress_expert(tv, tmp_path / "nps", name="nps", method="nps", density=0.05, task="length",
                               objective=objective, generations=2, population=4, bands=4)
    m = manifest.method
    # pycma may stop after one generation when the micro objective is flat
    assert m["name"] == "nps" and len(m["weights"]) == 4 and 1 <= len(m["history"]) <= 2
    assert manifest.calibration_score >= m["baseline_score"]
    assert m["evaluations"] == 1 + len(m["history"]) * 4
    assert abs(manifest.density - 0.05) < 0.002


def test_sparse_ft_keeps_the_magnitude_support_with_the_trainers_values(tv, tmp_path):
    from deltaserve.experts.sparsify import magnitude_mask

    seen = {}

    def trainer(masks):
        seen.update(masks)
        return {name: torch.full(mask.shape, 0.5) for name, mask in masks.items()}

    manifest = compress_expert(tv, tmp_path / "s", name="s", method="sparse_ft", density=0.05, trainer=trainer,
                               value_dtype=torch.float32)
    assert manifest.codec == "sparse_ef" and manifest.method["name"] == "sparse_ft"
    assert manifest.method["density"] == 0.05
    expert = load_expert(tmp_path / "s")
    name = "model.layers.1.self_attn.q_proj.weight"
    mask = magnitude_mask(tv.deltas[name], 0.05)
    assert torch.equal(seen[name], mask)
    assert torch.equal(expert.decode(name), torch.where(mask, 0.5, 0.0))
    with pytest.raises(ValueError, match="training data"):
        compress_expert(tv, tmp_path / "t", name="t", method="sparse_ft", density=0.05)
    with pytest.raises(ValueError, match="right shape"):
        compress_expert(tv, tmp_path / "u", name="u", method="sparse_ft", density=0.05,
                        trainer=lambda masks: {n: torch.zeros(1) for n in masks})
    assert not (tmp_path / "t").exists() and not (tmp_path / "u").exists()


def test_zoo_masked_trainer_moves_only_the_masked_entries(micro_zoo):
    from deltaserve_zoo.build import masked_trainer

    spec = micro_zoo.spec.full.model_copy(update={"steps": 5})
    masks = {name: torch.zeros_like(t, dtype=torch.bool) for name, t in
             extract(micro_zoo.layout.base, finetuned_dir=micro_zoo.layout.full("length")).deltas.items()}
    name = "model.layers.0.mlp.down_proj.weight"
    masks[name][:2] = True
    deltas = masked_trainer(micro_zoo.layout.base, "length", spec)(masks)
    assert set(deltas) == set(masks)
    assert deltas[name][:2].abs().sum() > 0 and not deltas[name][2:].any()
    assert all(not d.any() for n, d in deltas.items() if n != name)
