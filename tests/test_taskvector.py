import json
import shutil

import pytest
import torch

from deltaserve.experts.taskvector import (
    TaskVectorError, base_fingerprint, extract_full, extract_lora, load_state_dict, lora_factors,
)


def test_full_task_vector_reconstructs_the_finetune(micro_zoo):
    layout = micro_zoo.layout
    tv = extract_full(layout.base, layout.full("upper"))
    base, tuned = load_state_dict(layout.base), load_state_dict(layout.full("upper"))
    assert tv.kind == "full" and not tv.carried
    assert set(tv.deltas) == set(base)
    for name, delta in tv.deltas.items():
        # base + (tuned - base) is tuned up to one float32 rounding
        torch.testing.assert_close(base[name] + delta, tuned[name], rtol=0, atol=1e-6)
    assert any(d.abs().sum() > 0 for d in tv.deltas.values())
    assert tv.num_params() == sum(t.numel() for t in base.values())


def test_lora_task_vector_equals_peft_merge(micro_zoo):
    from peft import PeftModel

    from deltaserve_zoo.build import load_llama

    layout = micro_zoo.layout
    tv = extract_lora(layout.base, layout.lora("upper"))
    merged = PeftModel.from_pretrained(load_llama(layout.base), layout.lora("upper")).merge_and_unload()
    merged_sd, base = merged.state_dict(), load_state_dict(layout.base)
    assert tv.kind == "lora" and len(tv.deltas) == 7 * micro_zoo.spec.model.num_layers
    for name, delta in tv.deltas.items():
        torch.testing.assert_close(base[name] + delta, merged_sd[name], rtol=1e-5, atol=1e-6)
    factors, _ = lora_factors(layout.base, layout.lora("upper"))
    some = next(iter(factors.values()))
    assert some.A.shape[0] == 8 and some.scaling == 16 / 8


def test_fingerprint_is_stable_and_distinguishes_models(micro_zoo):
    layout = micro_zoo.layout
    assert base_fingerprint(layout.base) == base_fingerprint(layout.base)
    assert base_fingerprint(layout.base) != base_fingerprint(layout.full("upper"))


def test_refuses_a_model_of_another_architecture(micro_zoo, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(micro_zoo.layout.full("upper"), other)
    config = json.loads((other / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(TaskVectorError, match="num_hidden_layers"):
        extract_full(micro_zoo.layout.base, other)


def test_refuses_pickle_checkpoints_and_missing_dirs(micro_zoo, tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    (tmp_path / "config.json").write_text((micro_zoo.layout.base / "config.json").read_text())
    with pytest.raises(TaskVectorError, match="never loaded"):
        extract_full(micro_zoo.layout.base, tmp_path)
    with pytest.raises(TaskVectorError, match="not a directory"):  # before any config is read
        extract_full(micro_zoo.layout.base, tmp_path / "nope")


def test_refuses_truncated_weights(micro_zoo, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(micro_zoo.layout.full("upper"), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(TaskVectorError, match="cannot read"):
        extract_full(micro_zoo.layout.base, broken)


def test_refuses_non_lora_adapter(micro_zoo, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(micro_zoo.layout.lora("upper"), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["peft_type"] = "IA3"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(TaskVectorError, match="only LoRA"):
        extract_lora(micro_zoo.layout.base, adapter)
