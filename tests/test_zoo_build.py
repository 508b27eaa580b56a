import json

import pytest
import torch
from safetensors.torch import load_file

from deltaserve_zoo.build import ARTIFACT_FILE, ZooBuilder, load_llama
from deltaserve_zoo.matrix import AccuracyMatrix
from deltaserve_zoo.spec import FinetuneSpec, LlamaSpec, LoraSpec, PretrainSpec, VisionSpec, ZooSpec, preset

NANO = ZooSpec(
    size="nano",
    tasks=("reverse", "length"),
    model=LlamaSpec(hidden_size=64, num_layers=1, intermediate_size=64),
    pretrain=PretrainSpec(steps=6, batch_size=4, seq_len=32, text_bytes=20_000),
    full=FinetuneSpec(steps=4, batch_size=4, lr=1e-3, train_examples=40),
    lora=LoraSpec(steps=4, batch_size=4, lr=1e-3, train_examples=40),
    eval_examples=8,
    vision=VisionSpec(tasks=("rot90", "invert"), hidden_size=16, base_epochs=1, probe_epochs=1, finetune_epochs=1),
)


def _weights(builder):
    layout = builder.layout
    files = {"base": layout.base / "model.safetensors"}
    for t in builder.spec.tasks:
        files[f"full:{t}"] = layout.full(t) / "model.safetensors"
        files[f"lora:{t}"] = layout.lora(t) / "adapter_model.safetensors"
    for t in ("base", *builder.spec.vision.tasks):
        files[f"vision:{t}"] = layout.vision(t) / "model.safetensors"
    return {k: load_file(v) for k, v in files.items()}


def _built_markers(builder):
    return {p: p.stat().st_mtime_ns for p in builder.layout.root.rglob(ARTIFACT_FILE)}


@pytest.fixture(scope="module")
def nano_pair(tmp_path_factory):
    first = ZooBuilder(NANO, tmp_path_factory.mktemp("a"), log=lambda _: None)
    second = ZooBuilder(NANO, tmp_path_factory.mktemp("b"), log=lambda _: None)
    # One serial, one with two worker processes: the weights must not depend on it.
    return first, first.build(workers=1), second, second.build(workers=2)


def test_same_seed_same_weights_and_matrix_whatever_the_workers(nano_pair):
    first, m1, second, m2 = nano_pair
    w1, w2 = _weights(first), _weights(second)
    assert w1.keys() == w2.keys()
    for name in w1:
        assert w1[name].keys() == w2[name].keys()
        for t in w1[name]:
            assert torch.equal(w1[name][t], w2[name][t]), (name, t)
    assert [m.rows for m in m1] == [m.rows for m in m2]


def test_experts_differ_from_base(nano_pair):
    first = nano_pair[0]
    base = load_llama(first.layout.base).state_dict()
    expert = load_llama(first.layout.full("reverse")).state_dict()
    assert any(not torch.equal(base[k], expert[k]) for k in base)
    lora = load_file(first.layout.lora("reverse") / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())


def test_cached_build_rebuilds_nothing(nano_pair):
    first = nano_pair[0]
    before = _built_markers(first)
    ZooBuilder(NANO, first.layout.root, log=lambda _: None).build(workers=1)
    assert _built_markers(first) == before


def test_changed_lora_spec_rebuilds_only_lora(tmp_path):
    builder = ZooBuilder(NANO, tmp_path, log=lambda _: None)
    builder.build(workers=1)
    before = _built_markers(builder)
    changed = NANO.model_copy(update={"lora": NANO.lora.model_copy(update={"lr": 2e-3})})
    ZooBuilder(changed, tmp_path, log=lambda _: None).build(workers=1)
    after = _built_markers(builder)
    rebuilt = {p.parent.relative_to(tmp_path).as_posix() for p in before if before[p] != after[p]}
    assert rebuilt == {"experts/lora/reverse", "experts/lora/length", "matrix"}


def test_failed_artifact_leaves_nothing_half_written(tmp_path, monkeypatch):
    builder = ZooBuilder(NANO, tmp_path, log=lambda _: None)

    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("deltaserve_zoo.lm.pretrain", explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        builder.build_base()
    assert not builder.layout.base.exists()
    assert [p.name for p in tmp_path.iterdir()] == []


def test_micro_zoo_layout_and_formats(micro_zoo):
    from transformers import AutoConfig, AutoTokenizer

    layout, spec = micro_zoo.layout, micro_zoo.spec
    config = AutoConfig.from_pretrained(layout.base)
    assert config.model_type == "llama" and config.head_dim == spec.model.head_dim in (32, 64)
    tok = AutoTokenizer.from_pretrained(layout.base)
    assert tok.chat_template and tok.decode(tok("abc").input_ids, skip_special_tokens=True) == "abc"
    for task in spec.tasks:
        assert (layout.full(task) / "model.safetensors").is_file()
        adapter = json.loads((layout.lora(task) / "adapter_config.json").read_text())
        assert adapter["r"] == 8 and adapter["peft_type"] == "LORA"
        assert set(adapter["target_modules"]) >= {"q_proj", "v_proj", "down_proj"}
        assert (layout.lora(task) / "adapter_model.safetensors").is_file()
    assert not list(layout.root.rglob("*.bin")) and not list(layout.root.rglob("*.pt"))


def test_micro_matrix_complete(micro_zoo):
    llm = AccuracyMatrix.load(micro_zoo.layout.matrix / "llm.json")
    spec = micro_zoo.spec
    expected_rows = {"base"} | {f"{k}:{t}" for k in ("full", "lora") for t in spec.tasks}
    assert set(llm.rows) == expected_rows
    assert all(0.0 <= v <= 1.0 for row in llm.rows.values() for v in row.values())
    vis = AccuracyMatrix.load(micro_zoo.layout.matrix / "vision.json")
    assert set(vis.rows) == {"base"} | {f"expert:{t}" for t in spec.vision.tasks}
    md = (micro_zoo.layout.matrix / "llm.md").read_text()
    assert md.count("\n| ") == len(expected_rows) + 1  # header + one line per model


def test_presets_and_keys():
    assert preset("demo").model.hidden_size % 64 == 0
    with pytest.raises(ValueError, match="known sizes"):
        preset("huge")
    a = preset("micro")
    b = a.model_copy(update={"full": a.full.model_copy(update={"steps": 41})})
    assert a.key("full") != b.key("full") and a.key("lora") == b.key("lora")


def test_cached_base_from_another_corpus_is_refused(tmp_path, monkeypatch):
    builder = ZooBuilder(NANO, tmp_path, log=lambda _: None)
    builder.build_base()
    builder.build_base()  # cached and consistent: fine
    monkeypatch.setattr(ZooBuilder, "_pretraining_documents", lambda self: ["different corpus"])
    with pytest.raises(RuntimeError, match="ZOO_FORMAT_VERSION"):
        builder.build_base()
