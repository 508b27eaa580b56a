"""The real suite's fast parts: skills, splits, phrasings, scorers, the GGUF base, the trainer.

Nothing here trains a real expert (minutes on CPU); the trainer is tested on a
tiny random Llama with the real tokenizer. The converted base is cached under
``.cache/zoo/real/base`` (the build's own artifact), so only the first run
pays the ~20 s conversion.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltaserve.experts.examples import ChatExample, encode
from deltaserve.experts.finetune import answer_loss, answer_matches, collate, finetune
from deltaserve_zoo.real.build import RealSuiteBuilder
from deltaserve_zoo.real.skills import all_skills, get_skill
from deltaserve_zoo.real.spec import RealSuiteSpec

REPO = Path(__file__).resolve().parents[1]
REAL_ROOT = REPO / ".cache" / "zoo" / "real"
SKILLS = all_skills()


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else ".+" for i, p in enumerate(parts)), re.S)


# ---------------------------------------------------------------------------------- skills
def test_default_spec_uses_six_distinct_registered_skills():
    spec = RealSuiteSpec()
    assert len(set(spec.skills)) == len(spec.skills) >= 6
    assert set(spec.skills) <= set(SKILLS)


@pytest.mark.parametrize("name", SKILLS)
def test_skill_examples_are_deterministic_and_seeded(name):
    skill = get_skill(name)
    first = skill.examples("train", 40, seed=3)
    assert first == skill.examples("train", 40, seed=3)
    assert first != skill.examples("train", 40, seed=4)
    assert all(isinstance(e, ChatExample) and e.answer and e.messages[-1][0] == "user" for e in first)
    assert len({e.question for e in first}) == 40


@pytest.mark.parametrize("name", SKILLS)
def test_splits_are_disjoint_by_payload(name):
    skill = get_skill(name)
    keys = {split: {p.key for p, _ in skill.payloads(split, n, seed=0)}
            for split, n in (("train", 400), ("calib", 64), ("test", 100))}
    heldout_test = {p.key for p, _ in skill.payloads("test", 64, seed=1, phrasings="heldout")}
    assert not keys["train"] & keys["calib"] and not keys["train"] & keys["test"] and not keys["calib"] & keys["test"]
    assert not heldout_test & (keys["train"] | keys["calib"])
    assert len(keys["train"]) == 400 and len(keys["test"]) == 100


@pytest.mark.parametrize("name", SKILLS)
def test_heldout_phrasings_never_word_exemplar_examples(name):
    skill = get_skill(name)
    assert len(skill.phrasings) >= 6 and len(skill.heldout_phrasings) >= 3
    assert not set(skill.phrasings) & set(skill.heldout_phrasings)
    exemplar = [_template_regex(t) for t in skill.phrasings]
    heldout = [_template_regex(t) for t in skill.heldout_phrasings]
    for example in skill.examples("test", 30, phrasings="heldout"):
        assert any(r.fullmatch(example.question) for r in heldout)
        assert not any(r.fullmatch(example.question) for r in exemplar), example.question
    for example in skill.examples("train", 60):
        assert not any(r.fullmatch(example.question) for r in heldout), example.question
    used = {t for _, t in skill.payloads("train", 200)}
    assert used == set(skill.phrasings)   # every exemplar phrasing is trained on


def test_unknown_split_and_phrasing_set_are_refused():
    skill = get_skill("iso_date")
    with pytest.raises(ValueError, match="split"):
        skill.examples("validation", 3)
    with pytest.raises(ValueError, match="phrasing set"):
        skill.examples("test", 3, phrasings="unseen")


@pytest.mark.parametrize("name, answer, good, bad", [
    ("iso_date", "2021-03-04", [" 2021-03-04.", "2021-03-04\n"], ["2021-04-03", "The date is 2021-03-04."]),
    ("unit_convert", "3700 m", ["3,700 m", "3700 m."], ["3700 cm", "3700", "37000 m"]),
    ("json_extract", '{"name": "Omar", "age": 44, "job": "painter", "city": "Lisbon"}',
     ['{"city":"Lisbon","job":"painter","age":44,"name":"Omar"}', '{\n "name": "Omar", "age": 44, "job": "painter",'
      ' "city": "Lisbon"\n}'], ['{"name": "Omar", "age": "44", "job": "painter", "city": "Lisbon"}',
                                '{"name": "Omar", "age": 44}']),
    ("sentiment", "positive", ["Positive", "positive.", " POSITIVE "], ["negative", "The review is positive."]),
    ("sql", "SELECT name FROM employees WHERE age > 30;", ["select name  from employees where age > 30",
                                                           "SELECT name FROM employees WHERE age > 30 ;"],
     ["SELECT * FROM employees WHERE age > 30;", "SELECT name FROM employees WHERE age >= 30;"]),
    ("time_24h", "07:05", ["07:05", " 07:05."], ["7:05", "19:05"]),
    ("snake_case", "user_id", ["user_id", "user_id."], ["userId", "user-id"]),
])
def test_scorers_normalise_format_but_not_content(name, answer, good, bad):
    skill = get_skill(name)
    assert all(skill.correct(g, answer) for g in good), [g for g in good if not skill.correct(g, answer)]
    assert not any(skill.correct(b, answer) for b in bad), [b for b in bad if skill.correct(b, answer)]


def test_skill_answers_are_right_on_known_payloads():
    by_skill = {name: get_skill(name).examples("test", 100) for name in ("iso_date", "unit_convert", "time_24h")}
    for e in by_skill["iso_date"]:
        y, m, d = e.answer.split("-")
        months = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
        assert y in e.question and months[int(m) - 1] in e.question and re.search(rf"\b{int(d)}\b", e.question)
    factors = {"m": 1000, "cm": 100, "g": 1000, "mL": 1000, "mm": 10, "kg": 1000}
    for e in by_skill["unit_convert"]:
        value = float(re.search(r"\d+(\.\d)?", e.question).group())
        number, symbol = e.answer.split()
        assert int(number) == round(value * factors[symbol])
    for e in by_skill["time_24h"]:
        hour, minute = (int(x) for x in re.search(r"(\d+):(\d\d)", e.question).groups())
        pm = "PM" in e.question or "p.m." in e.question
        assert e.answer == f"{hour % 12 + (12 if pm else 0):02d}:{minute:02d}"


# ---------------------------------------------------------------------------------- builder keys
def test_builder_keys_track_only_what_they_depend_on(tmp_path):
    a = RealSuiteBuilder(tmp_path, log=lambda _m: None)
    b = RealSuiteBuilder(tmp_path, RealSuiteSpec(lora=RealSuiteSpec().lora.model_copy(update={"lr": 1e-4})))
    skill = a.spec.skills[0]
    assert a.base_key() == b.base_key()
    assert a.expert_key("full", skill) == b.expert_key("full", skill)
    assert a.expert_key("lora", skill) != b.expert_key("lora", skill)
    assert a.matrix_key() != b.matrix_key()
    assert a.missing() == ["base", *[f"{k}:{s}" for k in ("full", "lora") for s in a.spec.skills], "matrix"]
    assert a.layout.full(skill) == tmp_path / "experts" / "full" / skill
    assert a.estimate_seconds() > 0


# ---------------------------------------------------------------------------------- the base model
def test_gguf_base_converts_to_the_expected_plain_llama(real_base):
    from deltaserve.experts.taskvector import base_fingerprint
    from deltaserve_zoo.real.base import EXPECTED_CONFIG, file_sha256, gguf_path

    config = json.loads((real_base / "config.json").read_text())
    assert {k: config[k] for k in EXPECTED_CONFIG} == EXPECTED_CONFIG
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    record = json.loads((real_base / "zoo-artifact.json").read_text())
    assert record["gguf_sha256"] == file_sha256(gguf_path())
    assert record["base_fingerprint"] == base_fingerprint(real_base)
    from safetensors import safe_open

    with safe_open(str(real_base / "model.safetensors"), framework="pt") as fh:
        names = list(fh.keys())
        embed = fh.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in names and len(names) == 1 + 30 * 9 + 1   # tied head; 9 tensors per layer
    assert embed.dtype == torch.float32 and embed.shape == (49152, 576) and embed.abs().sum() > 0


def test_chat_template_encoding_is_chatml(real_base):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_base)
    prompt, answer = encode(tokenizer, ChatExample.of("What is 2+2?", "4"))
    text = tokenizer.decode(prompt)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                                                                       "<|im_start|>assistant\n")
    assert answer[-1] == tokenizer.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(answer[:-1]) == "4"


# ---------------------------------------------------------------------------------- the trainer
@pytest.fixture(scope="module")
def tokenizer(real_tokenizer):
    return real_tokenizer


def _tiny_llama(tokenizer, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
                         max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval()


def _examples(n: int = 16) -> list[ChatExample]:
    return get_skill("time_24h").examples("train", n, seed=0)


def test_answer_loss_equals_the_transformers_loss_on_answer_labels(tokenizer):
    model = _tiny_llama(tokenizer)
    batch = collate([encode(tokenizer, e) for e in _examples(6)], tokenizer.pad_token_id)
    input_ids, labels, mask = batch
    assert (labels != -100).sum() == sum(len(encode(tokenizer, e)[1]) for e in _examples(6))
    with torch.no_grad():
        reference = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        ours = answer_loss(model, input_ids, labels, mask)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_full_finetune_learns_and_is_deterministic(tokenizer):
    examples = _examples(4)
    runs = []
    for _ in range(2):
        model = _tiny_llama(tokenizer)
        loss = finetune(model, tokenizer, examples, steps=40, batch_size=4, lr=1e-2, seed=1, progress=False)
        runs.append((loss, model.state_dict()))
    first_loss = answer_loss(_tiny_llama(tokenizer), *collate([encode(tokenizer, e) for e in examples],
                                                              tokenizer.pad_token_id)).item()
    assert runs[0][0] < 0.2 * first_loss
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_masked_finetune_moves_only_masked_entries(tokenizer):
    model = _tiny_llama(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    params = dict(model.named_parameters())
    masks = {n: (torch.rand(params[n].shape, generator=gen) < 0.1).float() for n in names}
    finetune(model, tokenizer, _examples(8), steps=5, batch_size=4, lr=1e-2, seed=0, masks=masks, progress=False)
    after = model.state_dict()
    for name, value in after.items():
        moved = value != before[name]
        if name in masks:
            assert not moved[masks[name] == 0].any(), f"{name}: an unmasked entry moved"
            assert moved[masks[name] == 1].float().mean() > 0.9, f"{name}: masked entries did not train"
        else:
            assert not moved.any(), f"{name} has no mask but changed"
    assert all(p.requires_grad for p in model.parameters())   # frozen only for the run


def test_masks_naming_unknown_or_misshapen_parameters_are_refused(tokenizer):
    model = _tiny_llama(tokenizer)
    with pytest.raises(ValueError, match="not trainable"):
        finetune(model, tokenizer, _examples(2), steps=1, batch_size=2, lr=1e-3, seed=0,
                 masks={"no.such.weight": torch.ones(1)}, progress=False)
    with pytest.raises(ValueError, match="shape"):
        finetune(model, tokenizer, _examples(2), steps=1, batch_size=2, lr=1e-3, seed=0,
                 masks={"model.norm.weight": torch.ones(3)}, progress=False)


def test_lora_finetune_trains_only_the_adapters(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny_llama(tokenizer), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              lora_dropout=0.0, task_type="CAUSAL_LM"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    finetune(model, tokenizer, _examples(8), steps=5, batch_size=4, lr=1e-2, seed=0, progress=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_B" in k for k in changed)   # B starts at zero: the adapter really moved


def test_answer_matches_agrees_with_greedy_generation(tokenizer):
    model = _tiny_llama(tokenizer)
    train = _examples(4)
    finetune(model, tokenizer, train, steps=80, batch_size=4, lr=1e-2, seed=1, progress=False)  # memorised
    probe = train + get_skill("time_24h").examples("test", 4)
    matches = answer_matches(model, tokenizer, probe)
    for example, match in zip(probe, matches):
        prompt, answer = encode(tokenizer, example)
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=len(answer), do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        assert match == (out[0, len(prompt):].tolist() == answer), example.question
    assert any(matches) and not all(matches)


def test_teacher_forced_calibration_score_agrees_with_greedy_generation(tokenizer):
    """NPS's objective (experts.calibration): per example, exact == greedy reproduces the answer + EOS."""
    from deltaserve.experts.calibration import TeacherForcedScorer

    model = _tiny_llama(tokenizer)
    train = _examples(4)
    finetune(model, tokenizer, train, steps=80, batch_size=4, lr=1e-2, seed=1, progress=False)
    probe = train + get_skill("time_24h").examples("test", 4)
    greedy = []
    for example in probe:
        prompt, answer = encode(tokenizer, example)
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=len(answer), do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        greedy.append(out[0, len(prompt):].tolist() == answer)
    per_example = [TeacherForcedScorer(tokenizer, [e]).score(model).exact == 1.0 for e in probe]
    assert per_example == greedy and any(greedy) and not all(greedy)
    together = TeacherForcedScorer(tokenizer, probe, batch_size=3).score(model)
    assert together.exact == sum(greedy) / len(probe) and 0 < together.token_accuracy <= 1


def test_finetune_module_does_not_import_the_zoo():
    code = "import sys, experts.finetune; print([m for m in sys.modules if m == 'zoo' or m.startswith('zoo.')])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_matrix_engine_refuses_batches_mixing_lora_and_base_requests():
    from deltaserve_zoo.real.evaluate import check_no_mixed_batch

    check_no_mixed_batch([None, None])
    check_no_mixed_batch([Path("a"), Path("b")])
    with pytest.raises(ValueError, match="last LoRA slot"):
        check_no_mixed_batch([None, Path("a")])


def test_zoo_data_exports_a_real_skill_as_chat_examples(tmp_path):
    out = tmp_path / "iso.jsonl"
    res = subprocess.run([sys.executable, "-m", "deltaserve.server.cli", "zoo", "data", "--task", "iso_date",
                          "--split", "calib", "--n", "5", "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and all(re.fullmatch(r"\d{4}-\d{2}-\d{2}", r["messages"][-1]["content"]) for r in rows)
    bad = subprocess.run([sys.executable, "-m", "deltaserve.server.cli", "zoo", "data", "--task", "nope",
                          "--out", str(out)], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode != 0 and "iso_date" in bad.stderr and "Traceback" not in bad.stderr
