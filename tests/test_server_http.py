"""The HTTP layer in-process, with a fake engine: every documented 4xx, the error shape, 500s that leak nothing,
and the OpenAI/vLLM response shapes (strictly validated with the OpenAI SDK's and vLLM's own models)."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from deltaserve.experts.sources import Compression

from deltaserve.experts.store import ExpertStore
from deltaserve.server.app import create_app
from deltaserve.server.settings import EngineConfig, ServerSettings
from tests.fake_engine import ANSWER_IDS, FakeEngine

API, ADMIN = "inference-key", "admin-key"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def store_dir(micro_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    store = ExpertStore(root / "store", micro_zoo.layout.base)
    store.import_source("upper", micro_zoo.layout.full("upper"), compression=Compression(method="magnitude"))
    store.import_source("vowels-lora", micro_zoo.layout.lora("count_vowels"), exemplars=["How many vowels?"])
    return root / "store"


@pytest.fixture(scope="module")
def tokenizer(zoo_tokenizer):
    return zoo_tokenizer


@pytest.fixture()
def server(micro_zoo, store_dir, tokenizer):
    settings = ServerSettings(store_dir=store_dir, engine=EngineConfig(base_dir=micro_zoo.layout.base),
                              api_keys=[API], admin_keys=[ADMIN], register_roots=[micro_zoo.layout.root])
    engine = FakeEngine(settings.engine, ExpertStore(store_dir, micro_zoo.layout.base), tokenizer)
    app = create_app(settings, engine=engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        client.headers["authorization"] = f"Bearer {API}"
        yield client, engine


def _error(response, status: int, words: str, param: str | None = "any") -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == status and words.lower() in body["error"]["message"].lower(), body
    if param != "any":
        assert body["error"]["param"] == param, body
    return body["error"]


def _events(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]


def test_inference_4xx(server):
    c, _ = server
    post = c.post
    _error(post("/v1/chat/completions", json={"model": "no-such-expert", **CHAT}), 404, "unknown expert", "model")
    _error(post("/v1/chat/completions", json={"model": "0.5*upper+*", **CHAT}), 400, "cannot parse", "model")
    _error(post("/v1/chat/completions", json={"model": "frob:upper", **CHAT}), 400, "unknown merge method", "model")
    _error(post("/v1/chat/completions", json={"model": "ties(dens=1):upper", **CHAT}), 400, "valid options", "model")
    _error(post("/v1/chat/completions", json={"model": "ties(density=2):upper", **CHAT}), 400, "less than", "model")
    _error(post("/v1/chat/completions", content=b'{"model": "upper", "messages": [',
                headers={"content-type": "application/json"}), 400, "JSON")
    _error(post("/v1/chat/completions", json={"model": "upper", "messages": []}), 400, "messages", "messages")
    _error(post("/v1/chat/completions", json={"model": "upper", "messages": [{"role": "assistant", "content": "x"}]}),
           400, "must not be from the assistant", "messages")
    _error(post("/v1/completions", json={"model": "upper", "prompt": "x", "max_tokens": 10**6}), 400,
           "cannot be greater than max_model_len", "max_tokens")
    _error(post("/v1/completions", json={"model": "upper", "prompt": "x" * 400}), 400, "maximum context length",
           "input_tokens")
    _error(post("/v1/completions", json={"model": "upper", "prompt": "x", "temperature": -1}), 400, "temperature",
           "temperature")
    _error(post("/v1/route", json={"model": "auto"}), 400, "give `messages` or `prompt`", "messages")


def test_openai_and_vllm_refusals_4xx(server):
    """What vLLM refuses is refused the same way; what deltaserve does not serve is a 400, never ignored."""
    c, _ = server
    comp = lambda **kw: c.post("/v1/completions", json={"model": "upper", "prompt": "x", **kw})  # noqa: E731
    chat = lambda **kw: c.post("/v1/chat/completions", json={"model": "upper", **CHAT, **kw})  # noqa: E731
    _error(comp(stream_options={"include_usage": True}), 400, "stream=True", "stream_options")
    _error(chat(stream_options={"include_usage": True}), 400, "stream=True", "stream_options")
    _error(comp(logprobs="many"), 400, "must be an integer", "logprobs")
    _error(chat(top_logprobs=2), 400, "`logprobs` must be set to true", "top_logprobs")
    _error(comp(prompt_logprobs=1, stream=True), 400, "not available when `stream=True`", "prompt_logprobs")
    _error(comp(echo=True, logprobs=1, n=2), 400, "n = 1 only", "n")
    _error(comp(max_tokens=0), 400, "max_tokens", "max_tokens")
    _error(comp(stop=[""]), 400, "empty string")
    _error(comp(top_p=0), 400, "top_p", "top_p")
    _error(comp(response_format={"type": "json_schema"}), 400, "json_schema", "response_format")
    _error(comp(prompt=[3, 10**6]), 400, "outside the vocabulary", "prompt")
    _error(comp(prompt=[[3], []]), 400, "must not be empty", "prompt")
    _error(comp(prompt=[]), 400, "must not be empty", "prompt")
    _error(comp(prompt=["x"] * 65), 400, "at most 64 prompts", "prompt")
    for field, value in (("suffix", "end"), ("best_of", 3), ("use_beam_search", True), ("priority", 1),
                         ("watermarking", True), ("vllm_xargs", {"a": 1})):
        _error(comp(**{field: value}), 400, "not supported by deltaserve", field)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    _error(chat(tools=[tool]), 400, '"auto" tool choice requires --enable-auto-tool-choice', "tool_choice")
    _error(chat(tools=[tool], tool_choice="required"), 400, 'tool_choice="required" requires --tool-call-parser',
           "tool_choice")
    _error(chat(tools=[tool], tool_choice={"type": "function", "function": {"name": "g"}}), 400,
           "does not match any", "tool_choice")
    _error(chat(functions=[tool["function"]]), 400, "legacy function-calling", "functions")
    _error(chat(chat_template="{{ messages }}"), 400, "not trusted", "chat_template")
    _error(chat(chat_template_kwargs={"tokenize": True}), 400, "may not set ['tokenize']", "chat_template_kwargs")
    _error(chat(reasoning_effort="high"), 400, "reasoning parser", "reasoning_effort")
    _error(chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), 400,
           "only text content", "messages.0.content")
    _error(chat(continue_final_message=True, add_generation_prompt=True), 400, "Cannot set both")
    _error(chat(messages=None), 400, "must be a list", "messages")              # shapes vLLM's validators assume
    _error(comp(structured_outputs=1), 400, "must be an object", "structured_outputs")
    _error(chat(messages=[{"author": {"role": "user"}, "content": [{"type": "text", "text": "x"}]}]), 400,
           "not a chat message", "messages.0")


def test_responses_api_shapes_streams_and_refusals(server):
    """``/v1/responses`` over a recipe: vLLM's response object (validated by the OpenAI SDK's types), its event
    stream, the recipe in ``metadata``; what needs a response store or a built-in tool is a 400 naming it."""
    from openai.types.responses import Response, ResponseStreamEvent
    from pydantic import TypeAdapter

    c, _ = server
    post = lambda **kw: c.post("/v1/responses", json={"model": "upper", "input": "hi", "max_output_tokens": 3,  # noqa: E731
                                                       **kw})
    r = post()
    assert r.status_code == 200 and r.headers["x-deltaserve-recipe"] == "upper", r.text
    body = Response.model_validate(r.json())
    assert body.id.startswith("resp_") and body.status == "incomplete" and body.output_text and body.usage
    assert json.loads(body.metadata["deltaserve"])["recipe"] == "upper"
    events = [TypeAdapter(ResponseStreamEvent).validate_python(e) for e in _events(post(stream=True))]
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[-1].type == "response.completed" and events[-1].response.output_text == body.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert post(input=[{"role": "user", "content": "hi"}], instructions="Be brief.").status_code == 200
    _error(post(background=True), 400, "response store", "background")
    _error(post(previous_response_id="resp_1"), 400, "not stored", "previous_response_id")
    _error(post(tools=[{"type": "web_search"}]), 400, "built-in tools are not served (web_search)", "tools")
    _error(post(top_logprobs=2), 400, "logprobs are not returned", "top_logprobs")
    _error(post(conversation="conv_1"), 400, "response store", "conversation")
    _error(post(min_p=2.0), 400, "min_p")                                  # vLLM's sampling checks: 400, not 500
    _error(post(input=[{"type": "item_reference", "id": "x"}]), 400, "unsupported input item type", "input")
    _error(post(reasoning={"effort": "high"}), 400, "reasoning parser", "reasoning")
    _error(post(tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}}], tool_choice="required"),
           400, "requires --tool-call-parser", "tool_choice")
    _error(post(model="no-such-expert"), 404, "unknown expert", "model")
    _error(c.get("/v1/responses/resp_1"), 404, "not stored", "response_id")


def test_every_vllm_request_field_has_a_policy():
    """A vLLM upgrade that brings a new request field (completions, chat, responses) fails here until
    server.protocol says what to do with it."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from deltaserve.server.protocol.generation import NO_EFFECT, REFUSED, SAMPLING, SERVED, field_policy

    fields = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
    assert {f for f in fields if field_policy(f) == "unknown"} == set()
    tables = [set(SAMPLING), set(SERVED), set(NO_EFFECT), set(REFUSED)]
    assert all(not (a & b) for i, a in enumerate(tables) for b in tables[i + 1:])   # one policy per field
    assert set().union(*tables) <= fields | {"prompt"}

    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    from deltaserve.server.protocol import responses as api

    fields = set(ResponsesRequest.model_fields)
    assert {f for f in fields if api.field_policy(f) == "unknown"} == set()
    tables = [set(api.SAMPLING), set(api.SERVED), set(api.NO_EFFECT), set(api.REFUSED)]
    assert all(not (a & b) for i, a in enumerate(tables) for b in tables[i + 1:])
    assert set().union(*tables) <= fields


def test_sampling_options_reach_the_engine(server):
    c, engine = server
    body = {"model": "vowels-lora", "prompt": "Q: hello\nA: ", "max_tokens": 5, "top_k": 3, "min_p": 0.1,
            "repetition_penalty": 1.3, "min_tokens": 2, "bad_words": ["zz"], "include_stop_str_in_output": True,
            "stop": ["\n"], "stop_token_ids": [5], "seed": 7, "temperature": 0.5, "logit_bias": {"9": -100},
            "allowed_token_ids": [5, 6, 7], "skip_special_tokens": False, "truncate_prompt_tokens": 3,
            "ignore_eos": True}
    assert c.post("/v1/completions", json=body).status_code == 200
    call = engine.calls[-1]
    p = call["params"]
    assert (p.top_k, p.min_p, p.repetition_penalty, p.min_tokens, p.bad_words, p.include_stop_str_in_output) == \
        (3, 0.1, 1.3, 2, ["zz"], True)
    assert (p.stop, p.stop_token_ids, p.seed, p.temperature, p.allowed_token_ids, p.skip_special_tokens,
            p.ignore_eos, p.max_tokens) == (["\n"], [5], 7, 0.5, [5, 6, 7], False, True, 5)
    assert p.logit_bias == {9: -100} and len(call["prompt_ids"]) == 3          # truncated to the last 3 tokens
    chat = {"model": "upper", **CHAT, "max_completion_tokens": 3, "response_format": {"type": "json_object"}}
    assert c.post("/v1/chat/completions", json=chat).status_code == 200
    p = engine.calls[-1]["params"]
    assert p.max_tokens == 3 and p.structured_outputs.json_object is True
    assert c.post("/v1/chat/completions", json={**chat, "response_format": {"type": "text"}}).status_code == 200
    assert engine.calls[-1]["params"].structured_outputs is None                # OpenAI's no-op default
    short = {"model": "upper", "prompt": "x", "max_tokens": 255}
    assert c.post("/v1/completions", json=short).status_code == 200
    assert engine.calls[-1]["params"].max_tokens == 254                        # clamped to the context left, as vLLM


def test_token_prompts_echo_and_logprobs_in_openai_and_vllm_shapes(server, tokenizer):
    """lm-eval's loglikelihood request: token ids, echo, logprobs, max_tokens=1, in vLLM's shape (the OpenAI
    SDK's ``Completion`` type has no ``None`` for the first echoed token's logprob, which the API sends)."""
    from openai.types import Completion
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse

    c, engine = server
    ids = tokenizer.encode("Q: abc\nA: ABC")
    r = c.post("/v1/completions", json={"model": "vowels-lora", "prompt": [ids, ids[:4]], "max_tokens": 1,
                                        "logprobs": 1, "echo": True, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    CompletionResponse.model_validate(body)
    assert all(call["params"].prompt_logprobs == 1 for call in engine.calls[-2:])   # echo + logprobs -> prompt lp
    plain = c.post("/v1/completions", json={"model": "upper", "prompt": ids, "logprobs": 2, "max_tokens": 2})
    Completion.model_validate(plain.json(), strict=True)
    first, second = body["choices"]
    assert first["text"] == tokenizer.decode(ids) + "fake"
    assert first["logprobs"]["token_logprobs"][0] is None and len(first["logprobs"]["tokens"]) == len(ids) + 2
    assert first["logprobs"]["token_logprobs"][1:] == [-0.5] * (len(ids) + 1)
    assert all(len(top) == 2 for top in first["logprobs"]["top_logprobs"][1:])  # the token + 1 alternative
    offsets = first["logprobs"]["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0
    assert len(second["logprobs"]["tokens"]) == 4 + 2 and body["usage"]["prompt_tokens"] == len(ids) + 4
    r = c.post("/v1/completions", json={"model": "upper", "prompt": ids, "max_tokens": 0, "echo": True,
                                        "logprobs": 0, "return_token_ids": True, "prompt_logprobs": 0})
    only = r.json()["choices"][0]
    assert only["text"] == tokenizer.decode(ids) and len(only["logprobs"]["tokens"]) == len(ids)
    assert only["prompt_token_ids"] == ids and only["token_ids"] == ANSWER_IDS
    assert len(only["prompt_logprobs"]) == len(ids)


def test_chat_logprobs_fingerprint_and_strict_chunks(server):
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionResponse, ChatCompletionStreamResponse

    c, _ = server
    r = c.post("/v1/chat/completions", json={"model": "upper", **CHAT, "logprobs": True, "top_logprobs": 2,
                                             "return_token_ids": True, "return_prompt_text": True})
    body = r.json()
    ChatCompletion.model_validate(body, strict=True)
    ChatCompletionResponse.model_validate(body)
    content = body["choices"][0]["logprobs"]["content"]
    assert [t["logprob"] for t in content] == [-0.5, -0.5] and all(len(t["top_logprobs"]) == 2 for t in content)
    assert body["system_fingerprint"].startswith("fp_") and body["prompt_text"].endswith("A: ")
    again = c.post("/v1/chat/completions", json={"model": "upper", **CHAT}).json()["system_fingerprint"]
    other = c.post("/v1/chat/completions", json={"model": "vowels-lora", **CHAT}).json()["system_fingerprint"]
    assert again == body["system_fingerprint"] != other                        # same weights, same fingerprint
    s = c.post("/v1/chat/completions", json={"model": "vowels-lora", **CHAT, "stream": True, "logprobs": True,
                                             "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    chunks = _events(s)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk, strict=True)
        ChatCompletionStreamResponse.model_validate(chunk)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "fa"}   # role with the first token
    assert chunks[0]["usage"]["completion_tokens"] == 1 and chunks[0]["choices"][0]["logprobs"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


def test_a_500_names_only_the_request_id(server):
    c, engine = server
    engine.fail_with = RuntimeError("secret detail /etc/shadow")
    r = c.post("/v1/chat/completions", json={"model": "upper", **CHAT}, headers={"x-request-id": "rid-123"})
    err = _error(r, 500, "internal server error (request id rid-123)")
    assert "secret" not in r.text and "RuntimeError" not in r.text and r.headers["x-request-id"] == "rid-123"
    stream = c.post("/v1/chat/completions", json={"model": "upper", "stream": True, **CHAT})
    _error(stream, 500, "internal server error")          # failed before the first token: an HTTP error
    assert "secret" not in stream.text and err["type"] == "server_error"


def test_responses_and_streams_have_openai_shapes(server):
    from vllm.entrypoints.openai.completion.protocol import CompletionStreamResponse

    c, engine = server
    r = c.post("/v1/chat/completions", json={"model": "0.5*upper+0.5*vowels-lora", "n": 2, **CHAT})
    assert r.status_code == 200 and r.headers["x-deltaserve-recipe"] == "0.5*upper+0.5*vowels-lora"
    body = r.json()
    assert [ch["message"] for ch in body["choices"]] == [{"role": "assistant", "content": "fake"}] * 2
    assert body["deltaserve"]["path"] == "dense" and body["usage"]["completion_tokens"] == 4
    assert r.headers["x-request-id"]
    r = c.post("/v1/chat/completions", json={"model": "ties(density=0.3):upper", **CHAT})
    assert r.json()["deltaserve"]["options"] == {"density": 0.3}
    assert engine.calls[-1]["plan"].merge_request().options == {"density": 0.3}
    s = c.post("/v1/chat/completions", json={"model": "vowels-lora", "stream": True,
                                             "stream_options": {"include_usage": True}, **CHAT})
    chunks = _events(s)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "fa"}   # role with the first token
    assert chunks[1]["choices"][0]["delta"] == {"content": "ke"} and chunks[-1]["usage"]["total_tokens"] > 0
    assert s.text.rstrip().endswith("data: [DONE]")
    s = c.post("/v1/completions", json={"model": "upper", "prompt": "abc", "stream": True, "echo": True,
                                        "logprobs": 1, "max_tokens": 2})
    chunks = _events(s)
    for chunk in chunks:   # (the OpenAI SDK types a streamed completion as a final one: no null finish_reason)
        CompletionStreamResponse.model_validate(chunk)
    assert chunks[0]["choices"][0]["text"] == "abcfa" and chunks[1]["choices"][0]["text"] == "ke"
    offsets = [o for ch in chunks for o in ch["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == sorted(offsets) and len(offsets) == len("abc") + 1 + 2     # BOS + prompt + 2 tokens


def test_tokenize_detokenize_models_and_lora_aliases(server, micro_zoo, tokenizer):
    c, _ = server
    r = c.post("/tokenize", json={"model": "upper", "prompt": "abc", "add_special_tokens": False,
                                  "return_token_strs": True}).json()
    assert r["tokens"] == tokenizer.encode("abc", add_special_tokens=False) and r["count"] == 3
    assert r["max_model_len"] == 256 and len(r["token_strs"]) == 3
    chat = c.post("/tokenize", json={"messages": CHAT["messages"]}).json()
    assert tokenizer.decode(chat["tokens"]).endswith("A: ")
    assert c.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "abc"}
    info = c.get("/tokenizer_info").json()
    assert info["eos_token"] and info["tokenizer_class"] and "A:" in info["chat_template"]
    _error(c.post("/tokenize", json={"model": "nope", "prompt": "x"}), 404, "unknown expert", "model")
    _error(c.post("/detokenize", json={"tokens": [10**6]}), 400, "outside the vocabulary", "tokens")
    _error(c.post("/detokenize", json={"tokens": [-1]}), 400, "outside the vocabulary", "tokens")
    card = c.get("/v1/models/0.5*upper+0.5*vowels-lora").json()
    assert card["deltaserve"]["path"] == "dense" and card["max_model_len"] == 256
    assert c.get("/v1/models/upper").json()["deltaserve"]["codec"] and c.get("/v1/models/base").json()["id"] == "base"
    _error(c.get("/v1/models/nope"), 404, "unknown expert", "model")
    _error(c.get("/v1/models/0.5*upper+*"), 400, "cannot parse", "model")

    admin = {"authorization": f"Bearer {ADMIN}"}
    lora = str(micro_zoo.layout.lora("upper"))
    load = lambda body, h=admin: c.post("/v1/load_lora_adapter", json=body, headers=h)  # noqa: E731
    r = load({"lora_name": "upper-lora", "lora_path": lora})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'upper-lora' added successfully."
    assert c.get("/v1/experts/upper-lora").json()["path"] == "lora"
    _error(load({"lora_name": "upper-lora", "lora_path": lora}), 409, "already exists")
    assert load({"lora_name": "upper-lora", "lora_path": lora, "load_inplace": True}).status_code == 200
    _error(load({"lora_name": "evil", "lora_path": "/etc"}), 403, "outside the allowed", "path")
    _error(load({"lora_name": "x", "lora_path": lora}, {}), 403, "may not manage experts")
    _error(load({"lora_name": "x", "lora_path": lora, "is_3d_lora_weight": True}), 400, "3D", "is_3d_lora_weight")
    r = c.post("/v1/unload_lora_adapter", json={"lora_name": "upper-lora"}, headers=admin)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'upper-lora' removed successfully."
    _error(c.post("/v1/unload_lora_adapter", json={"lora_name": "upper-lora"}, headers=admin), 404, "unknown expert")


def test_auth_and_routes_4xx(server):
    c, _ = server
    _error(c.get("/v1/models", headers={"authorization": ""}), 401, "missing bearer token")
    _error(c.get("/v1/models", headers={"authorization": "Bearer nope"}), 401, "invalid api key")
    _error(c.post("/tokenize", json={"prompt": "x"}, headers={"authorization": ""}), 401, "missing bearer token")
    _error(c.post("/v1/experts", json={"name": "x", "path": "/tmp"}), 403, "may not manage experts")
    _error(c.get("/v1/no-such-route"), 404, "no route GET /v1/no-such-route")
    _error(c.put("/v1/models"), 405, "not allowed")
    _error(c.get("/v1/experts/nope"), 404, "unknown expert")
    _error(c.delete("/v1/experts/nope", headers={"authorization": f"Bearer {ADMIN}"}), 404, "unknown expert")


def test_registration_4xx(server, micro_zoo, tmp_path):
    c, _ = server
    admin = {"authorization": f"Bearer {ADMIN}"}
    lora = str(micro_zoo.layout.lora("upper"))
    full = str(micro_zoo.layout.full("upper"))
    reg = lambda body: c.post("/v1/experts", json=body, headers=admin)  # noqa: E731
    _error(reg({"name": "evil", "path": "/etc"}), 403, "outside the allowed registration roots", "path")
    _error(reg({"name": "auto", "path": lora}), 400, "reserved", "name")
    _error(reg({"name": "upper", "path": lora}), 409, "already exists")
    _error(reg({"name": "Bad Name", "path": lora}), 400, "must match")
    _error(reg({"name": "x", "path": full, "compression": {"method": "zip"}}), 400, "unknown compression method",
           "compression")
    _error(reg({"name": "x", "path": full, "compression": {"method": "magnitude", "rank": 3}}), 400,
           "valid options: ['density', 'values']", "compression")
    _error(reg({"name": "x", "path": full, "compression": {"method": "nps"}}), 400, "needs `compression.calibration`",
           "compression.calibration")
    _error(reg({"name": "x", "path": full, "compression": {"method": "nps", "calibration": "/etc/passwd"}}), 403,
           "outside", "compression.calibration")
    _error(reg({"name": "x", "path": full, "compression": {"method": "nps", "calibration": [{"messages": []}]}}),
           400, "compression.calibration[0]")
    broken = micro_zoo.layout.root / "broken-for-http-test"
    shutil.rmtree(broken, ignore_errors=True)
    shutil.copytree(c.app.state.service.store.path("upper"), broken)
    try:
        (broken / "tensors.safetensors").write_bytes(b"garbage")
        _error(reg({"name": "broken", "path": str(broken)}), 400, "tensors.safetensors")
    finally:
        shutil.rmtree(broken)
    assert "broken" not in c.app.state.service.store.names()


def test_openapi_documents_the_error_shape(server):
    c, _ = server
    spec = c.get("/openapi.json").json()
    post = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "400" in post and "ErrorResponse" in json.dumps(post["400"])
    assert '"422"' not in json.dumps(spec["paths"])
    assert {"/tokenize", "/detokenize", "/v1/load_lora_adapter", "/v1/models/{model_id}"} <= set(spec["paths"])


def test_hostile_inputs_get_4xx_never_500(server):
    c, _ = server
    app_settings = c.app.state.service.settings
    big = "x" * (app_settings.max_request_bytes + 10)
    _error(c.post("/v1/completions", json={"model": "upper", "prompt": big}), 413, "larger than")
    raw = b'{"model": "upper", "max_tokens": 2, "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    _error(c.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}), 400,
           "lone surrogate")
    _error(c.post("/v1/completions", json={"model": "upper", "prompt": "x", "seed": 2**64}), 400, "seed", "seed")
    deep = '{"model": "upper", "prompt": "x", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = c.post("/v1/completions", content=deep.encode(), headers={"content-type": "application/json"})
    assert r.status_code in (400, 413), r.text
    admin = {"authorization": f"Bearer {ADMIN}"}
    _error(c.post("/v1/experts", json={"name": "x", "path": "a\x00b"}, headers=admin), 400, "path", "path")
    _error(c.post("/v1/experts", json={"name": "x", "path": "a" * 10_000}, headers=admin), 400, "path", "path")
    _error(c.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "a\x00b"}, headers=admin), 400,
           "lora_path", "lora_path")
    for model in ("dare_ties:upper+vowels-lora", "dare_linear(density=0.5,seed=7):upper"):
        r = c.post("/v1/chat/completions", json={"model": model, **CHAT})
        assert r.status_code == 200 and r.json()["deltaserve"]["path"] == "dense", r.text


def test_links_out_of_the_register_root_are_refused(server, micro_zoo, tmp_path):
    c, _ = server
    inside = micro_zoo.layout.root / "linked-lora-for-http-test"
    shutil.rmtree(inside, ignore_errors=True)
    inside.mkdir()
    outside = tmp_path / "outside"
    shutil.copytree(micro_zoo.layout.lora("upper"), outside)
    try:
        for f in outside.iterdir():
            (inside / f.name).symlink_to(f)
        r = c.post("/v1/experts", json={"name": "linked", "path": str(inside)},
                   headers={"authorization": f"Bearer {ADMIN}"})
        _error(r, 403, "outside the allowed registration roots", "path")
    finally:
        shutil.rmtree(inside)
    assert "linked" not in c.app.state.service.store.names()


def test_a_router_that_times_out_is_a_503_not_a_500(micro_zoo, store_dir, tokenizer):
    class SlowRouting:
        """What the uncertainty router raises when its scoring queue outlasts SCORE_TIMEOUT_S."""

        def route(self, texts):
            raise TimeoutError

        def set_experts(self, *args, **kwargs):
            pass

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    settings = ServerSettings(store_dir=store_dir, engine=EngineConfig(base_dir=micro_zoo.layout.base))
    engine = FakeEngine(settings.engine, ExpertStore(store_dir, micro_zoo.layout.base), tokenizer)
    with TestClient(create_app(settings, engine=engine, routing=SlowRouting()), raise_server_exceptions=False) as c:
        r = c.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    _error(r, 503, "routing timed out")


def test_a_router_at_capacity_is_a_503_with_retry_after(micro_zoo, store_dir, tokenizer):
    from deltaserve.router.batcher import RouterBusy

    class BusyRouting:
        def route(self, texts, allowed=None):
            raise AssertionError("not reached: the batcher refuses first")

        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    settings = ServerSettings(store_dir=store_dir, engine=EngineConfig(base_dir=micro_zoo.layout.base))
    engine = FakeEngine(settings.engine, ExpertStore(store_dir, micro_zoo.layout.base), tokenizer)
    with TestClient(create_app(settings, engine=engine, routing=BusyRouting()), raise_server_exceptions=False) as c:
        batcher = c.app.state.service._route_batcher()

        async def refuse(text, allowed=None):
            raise RouterBusy(64, 7.2)
        batcher.route = refuse
        r = c.post("/v1/chat/completions", json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    _error(r, 503, "at capacity (64 prompts waiting)")
    assert r.headers["retry-after"] == "8"


def test_named_recipes_are_models_with_their_own_4xx(server):
    """POST /v1/recipes names a recipe: a `model` like any other, listed in /v1/models with parent = the base;
    names never shadow experts, the base or `auto`; a recipe whose expert goes away is a 503 saying so."""
    c, engine = server
    admin = {"authorization": f"Bearer {ADMIN}"}
    _error(c.post("/v1/recipes", json={"name": "bot", "recipe": "0.7*upper+0.3*vowels-lora"}), 403, "may not")
    r = c.post("/v1/recipes", json={"name": "bot", "recipe": "dare_ties(density=0.5,seed=3):upper+vowels-lora"},
               headers=admin)
    assert r.status_code == 201, r.text
    card = r.json()
    assert card["key"] == "dare_ties(density=0.5;seed=3):upper+vowels-lora" and card["path"] == "dense"
    try:
        r = c.post("/v1/chat/completions", json={"model": "bot", **CHAT})
        assert r.status_code == 200 and r.json()["deltaserve"]["recipe"] == card["key"], r.text
        assert engine.calls[-1]["plan"].recipe.key == card["key"]
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        assert models["bot"]["parent"] == models["bot"]["root"] == engine.config.served_name
        assert models["bot"]["deltaserve"]["kind"] == "named_recipe"
        assert [x["id"] for x in c.get("/v1/recipes").json()["data"]] == ["bot"]
        _error(c.post("/v1/recipes", json={"name": "upper", "recipe": "vowels-lora"}, headers=admin), 409, "expert")
        _error(c.post("/v1/recipes", json={"name": "auto", "recipe": "upper"}, headers=admin), 400, "reserved", "name")
        _error(c.post("/v1/recipes", json={"name": "b2", "recipe": "bot"}, headers=admin), 400, "named recipe",
               "recipe")
        _error(c.post("/v1/recipes", json={"name": "b2", "recipe": "nope+upper"}, headers=admin), 400, "unknown",
               "recipe")
        _error(c.post("/v1/recipes", json={"name": "Bad Name", "recipe": "upper"}, headers=admin), 400, "must match")
        _error(c.get("/v1/recipes/none"), 404, "unknown named recipe")
        engine.store.set_recipe("gone", "0.5*no-such")   # written by hand: its expert is not in the store
        c.post("/v1/recipes", json={"name": "b3", "recipe": "upper"}, headers=admin)   # any change syncs the service
        _error(c.post("/v1/chat/completions", json={"model": "gone", **CHAT}), 503, "not servable now")
        assert c.get("/v1/recipes/gone").json()["unavailable"]
    finally:
        for name in ("bot", "gone", "b3"):
            c.delete(f"/v1/recipes/{name}", headers=admin)
    _error(c.delete("/v1/recipes/bot", headers=admin), 404, "unknown named recipe")
    _error(c.post("/v1/chat/completions", json={"model": "bot", **CHAT}), 404, "unknown expert")


def test_metrics_need_no_key_unless_asked(micro_zoo, store_dir, tokenizer):
    """/metrics is open with inference keys configured (the gateway's scraper has none); --ops-need-key closes it.
    Either way it carries the gateway's metrics (their values are tested through the real engine, test_gateway)."""
    for ops_need_key, anonymous in ((False, 200), (True, 401)):
        settings = ServerSettings(store_dir=store_dir, engine=EngineConfig(base_dir=micro_zoo.layout.base),
                                  api_keys=[API], admin_keys=[ADMIN], ops_need_key=ops_need_key)
        engine = FakeEngine(settings.engine, ExpertStore(store_dir, micro_zoo.layout.base), tokenizer)
        with TestClient(create_app(settings, engine=engine), raise_server_exceptions=False) as c:
            assert c.get("/v1/models").status_code == 401
            assert c.get("/metrics").status_code == anonymous
            keyed = c.get("/metrics", headers={"authorization": f"Bearer {API}"})
            assert "deltaserve_recipe_requests_info{" in keyed.text
            assert "deltaserve_num_requests_waiting 0.0" in keyed.text


def test_expert_listing_pages_and_listings_follow_the_store(server, micro_zoo):
    """/v1/experts in id order, whole or in pages (OpenAI's list shape: `limit`, `after`, `has_more`, `last_id`);
    both listings are built once per store state (server.listing) and rebuilt after a registration or deletion."""
    c, engine = server
    admin = {"authorization": f"Bearer {ADMIN}"}
    whole = c.get("/v1/experts").json()
    ids = [e["id"] for e in whole["data"]]
    assert ids == sorted(ids) and len(ids) >= 2 and not whole["has_more"] and whole["last_id"] == ids[-1]
    first = c.get("/v1/experts", params={"limit": 1}).json()
    assert [e["id"] for e in first["data"]] == ids[:1] and first["has_more"] and first["last_id"] == ids[0]
    rest = c.get("/v1/experts", params={"after": first["last_id"]}).json()
    assert [e["id"] for e in rest["data"]] == ids[1:] and not rest["has_more"]
    assert c.get("/v1/experts", params={"after": "~"}).json()["data"] == []   # a cursor need not exist
    _error(c.get("/v1/experts", params={"limit": 0}), 400, "greater than or equal to 1", "query.limit")
    assert c.get("/v1/models").content == c.get("/v1/models").content   # the same state: the same listing
    r = c.post("/v1/experts", json={"name": "aaa-new", "path": str(micro_zoo.layout.lora("upper"))}, headers=admin)
    assert r.status_code == 201, r.text
    try:
        assert "aaa-new" in [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert c.get("/v1/experts", params={"limit": 1}).json()["data"][0]["id"] == "aaa-new"
    finally:
        c.delete("/v1/experts/aaa-new", headers=admin)
    assert "aaa-new" not in [m["id"] for m in c.get("/v1/models").json()["data"]]
    assert [e["id"] for e in c.get("/v1/experts").json()["data"]] == ids
