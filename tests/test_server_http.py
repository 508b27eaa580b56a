"""The HTTP layer in-process, with a fake engine: every documented 4xx, the error shape, 500s that leak nothing."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from experts.store import Compression, ExpertStore
from server.app import create_app
from server.settings import EngineConfig, ServerSettings
from tests.fake_engine import FakeEngine
from zoo.tokenizer import build_tokenizer

API, ADMIN = "inference-key", "admin-key"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def store_dir(micro_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("http")
    store = ExpertStore(root / "store", micro_zoo.layout.base)
    store.import_source("upper", micro_zoo.layout.full("upper"), compression=Compression(method="magnitude"))
    store.import_source("vowels-lora", micro_zoo.layout.lora("count_vowels"), exemplars=["How many vowels?"])
    return root / "store"


@pytest.fixture()
def server(micro_zoo, store_dir):
    settings = ServerSettings(store_dir=store_dir, engine=EngineConfig(base_dir=micro_zoo.layout.base),
                              api_keys=[API], admin_keys=[ADMIN], register_roots=[micro_zoo.layout.root])
    engine = FakeEngine(settings.engine, ExpertStore(store_dir, micro_zoo.layout.base), build_tokenizer())
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
    _error(post("/v1/completions", json={"model": "upper", "prompt": "x", "max_tokens": 10**6}), 400, "exceeds",
           "max_tokens")
    _error(post("/v1/completions", json={"model": "upper", "prompt": "x", "logprobs": 1}), 400, "not supported",
           "logprobs")
    _error(post("/v1/completions", json={"model": "upper", "prompt": "x", "temperature": -1}), 400, "temperature",
           "temperature")
    _error(post("/v1/route", json={"model": "auto"}), 400, "give `messages` or `prompt`", "messages")


def test_auth_and_routes_4xx(server):
    c, _ = server
    _error(c.get("/v1/models", headers={"authorization": ""}), 401, "missing bearer token")
    _error(c.get("/v1/models", headers={"authorization": "Bearer nope"}), 401, "invalid api key")
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
           "valid options: ['density']", "compression")
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


def test_a_500_names_only_the_request_id(server):
    c, engine = server
    engine.fail_with = RuntimeError("secret detail /etc/shadow")
    r = c.post("/v1/chat/completions", json={"model": "upper", **CHAT}, headers={"x-request-id": "rid-123"})
    err = _error(r, 500, "internal server error (request id rid-123)")
    assert "secret" not in r.text and "RuntimeError" not in r.text and r.headers["x-request-id"] == "rid-123"
    stream = c.post("/v1/chat/completions", json={"model": "upper", "stream": True, **CHAT})
    events = [json.loads(line[6:]) for line in stream.text.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == 500 and "secret" not in stream.text and err["type"] == "server_error"


def test_responses_and_streams_have_openai_shapes(server):
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
    chunks = [json.loads(line[6:]) for line in s.text.splitlines() if line.startswith("data: {")]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "fa"}   # role with the first token
    assert chunks[1]["choices"][0]["delta"] == {"content": "ke"} and chunks[-1]["usage"]["total_tokens"] > 0
    assert s.text.rstrip().endswith("data: [DONE]")


def test_openapi_documents_the_error_shape(server):
    c, _ = server
    spec = c.get("/openapi.json").json()
    post = spec["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert "400" in post and "ErrorResponse" in json.dumps(post["400"])


def test_hostile_inputs_get_4xx_never_500(server):
    c, engine = server
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
    for model in ("dare_ties:upper+vowels-lora", "dare_linear(density=0.5,seed=7):upper"):
        r = c.post("/v1/chat/completions", json={"model": model, **CHAT})
        assert r.status_code == 200 and r.json()["deltaserve"]["path"] == "dense", r.text
    spec = c.get("/openapi.json").json()
    assert '"422"' not in json.dumps(spec["paths"])


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
