"""Tenants through the HTTP layer with a fake engine (fast): scoped keys, the isolation matrix (2 tenants x every
endpoint x own / other's / public / missing expert), `auto` that never crosses tenants, per-key limits, key-file
reloads, keys kept out of logs, and the audit log. The same matrix through the real engine:
tests/test_tenants_engine.py."""

from __future__ import annotations

import json
import logging
import shutil
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from deltaserve.experts.store import ExpertStore
from deltaserve.router.base import Policy
from deltaserve.router.knn import KnnRouter
from deltaserve.router.service import RoutingService
from deltaserve.server import tenants
from deltaserve.server.app import create_app
from deltaserve.server.limits import Limiter
from deltaserve.server.settings import EngineConfig, ServerSettings
from deltaserve.server.tenants import Caller, KeyEntry, hash_key, new_key
from tests.fake_engine import FakeEngine

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
SECRET_PROMPT = "How many vowels are in the word globex-private-kiwi?"
# each tenant's own expert, the other's, the public one, and one that does not exist
EXPERTS = {"acme": "acme.vowels", "globex": "globex.vowels"}
PUBLIC, HIDDEN, MISSING = "shared-digits", "ops.min", "nobody.nothing"


class WordsEncoder:
    """Bag of hashed words: texts that share words are near (enough for a router over a handful of exemplars)."""

    name, dim, identity = "words", 64, None

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i, sum(map(ord, word)) % self.dim] += 1.0
        return out + 1e-3


def keys_toml(entries: list[KeyEntry], public: list[str]) -> str:
    lines = [f"public = {json.dumps(public)}"]
    for e in entries:
        lines += ["[[keys]]", *(f"{k} = {json.dumps(v)}" for k, v in e.model_dump(exclude_none=True).items())]
    return "\n".join(lines) + "\n"


def make_key(tenant, role="inference", **limits) -> tuple[str, KeyEntry]:
    key, key_id = new_key()
    return key, KeyEntry(id=key_id, hash=hash_key(key), tenant=tenant, role=role, name=f"{tenant}-{role}", **limits)


@pytest.fixture(scope="module")
def keyset():
    keys = {"acme": make_key("acme"), "acme-admin": make_key("acme", "admin"), "globex": make_key("globex"),
            "globex-admin": make_key("globex", "admin"), "initech": make_key("initech"),
            "root": make_key(None, "global_admin"), "slow": make_key("acme", rpm=2),
            "frugal": make_key("globex", tpm=5)}
    return keys


def seed_tenant_store(zoo, store_dir) -> None:
    """Each tenant's expert (globex's exemplar is the prompt acme sends), a public one and a hidden one."""
    store = ExpertStore(store_dir, zoo.layout.base)
    lora = zoo.layout.lora
    store.import_source("acme.vowels", lora("count_vowels"), exemplars=["How many vowels are in banana?"])
    store.import_source("globex.vowels", lora("count_vowels"), exemplars=[SECRET_PROMPT])
    store.import_source(PUBLIC, lora("max_digit"), exemplars=["What is the largest digit in 4817?"])
    store.import_source(HIDDEN, lora("min_digit"), exemplars=["What is the smallest digit in 4817?"])


@pytest.fixture(scope="module")
def store_dir(micro_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")
    seed_tenant_store(micro_zoo, root / "store")
    return root / "store"


@pytest.fixture()
def server(micro_zoo, store_dir, zoo_tokenizer, keyset, tmp_path, monkeypatch):
    monkeypatch.setattr(tenants, "RELOAD_CHECK_S", 0.0)
    key_file = tmp_path / "keys.toml"
    key_file.write_text(keys_toml([e for _, e in keyset.values()], [PUBLIC]))
    for tenant in ("acme", "globex"):   # each tenant's uploads, under its own folder of the registration root
        shutil.copytree(micro_zoo.layout.lora("max_digit"), tmp_path / "uploads" / tenant / "max_digit")
    settings = ServerSettings(store_dir=store_dir, engine=EngineConfig(base_dir=micro_zoo.layout.base),
                              key_file=key_file, audit_log=tmp_path / "audit.jsonl",
                              register_roots=[tmp_path / "uploads"])
    engine = FakeEngine(settings.engine, ExpertStore(store_dir, micro_zoo.layout.base), zoo_tokenizer)
    routing = RoutingService(KnnRouter(WordsEncoder(), k=3), Policy(max_distance=None, min_confidence=0.0))
    with TestClient(create_app(settings, engine=engine, routing=routing), raise_server_exceptions=False) as client:
        client.key_file, client.audit, client.uploads = key_file, tmp_path / "audit.jsonl", tmp_path / "uploads"
        yield client


def as_(keyset, who: str) -> dict:
    return {"authorization": f"Bearer {keyset[who][0]}"}


def _requests(name: str, partner: str = PUBLIC) -> list[tuple[str, str, dict | None]]:
    """Every endpoint that names an expert: (method, path, body)."""
    return [("GET", f"/v1/models/{name}", None), ("GET", f"/v1/experts/{name}", None),
            ("POST", "/v1/chat/completions", {"model": name, **CHAT}),
            ("POST", "/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 2}),
            ("POST", "/v1/chat/completions", {"model": f"0.5*{name}+0.5*{partner}", **CHAT}),
            ("POST", "/v1/route", {"model": name, "prompt": "hi"}),
            ("POST", "/tokenize", {"model": name, "prompt": "hi"}),
            ("POST", "/v1/responses", {"model": name, "input": "hi", "max_output_tokens": 2})]


@pytest.mark.parametrize("tenant,other", [("acme", "globex"), ("globex", "acme")])
def test_isolation_matrix(server, keyset, tenant, other):
    """Own and public experts answer; the other tenant's answer exactly as a missing one does (same status, same
    message but for the name), and no response names anything the caller may not see."""
    headers = as_(keyset, tenant)
    own, theirs = EXPERTS[tenant], EXPERTS[other]
    for name in (own, PUBLIC):
        for method, path, body in _requests(name, own if name == PUBLIC else PUBLIC):
            r = server.request(method, path, json=body, headers=headers)
            assert r.status_code == 200, (name, path, r.text)
            assert other not in r.text and HIDDEN not in r.text, (path, r.text)
    for name in (theirs, HIDDEN):
        for (method, path, body), (_, _, missing_body) in zip(_requests(name), _requests(MISSING)):
            r = server.request(method, path, json=body, headers=headers)
            missing = server.request(method, path.replace(name, MISSING), json=missing_body, headers=headers)
            assert r.status_code == missing.status_code and r.status_code in (400, 404), (name, path, r.text)
            assert r.text.replace(name, MISSING) == missing.text, (path, r.text, missing.text)
            assert other not in r.text.replace(theirs, "") and HIDDEN not in r.text.replace(name, ""), r.text
    listed = {m["id"] for m in server.get("/v1/models", headers=headers).json()["data"]}
    assert {own, PUBLIC} <= listed and not listed & {theirs, HIDDEN}
    experts = server.get("/v1/experts", headers=headers).json()
    assert {e["id"] for e in experts["data"]} == {own, PUBLIC}
    assert other not in server.get("/v1/experts?limit=1&after=a", headers=headers).text


def test_admin_matrix(server, keyset):
    """A tenant's admin registers and deletes '<tenant>.<name>' only, from its own uploads folder; the other's
    experts are missing to it, the public one is visible but not its to delete; inference keys manage nothing;
    the global admin sees all."""
    admin = as_(keyset, "acme-admin")
    source = str(server.uploads / "acme" / "max_digit")
    r = server.post("/v1/experts", json={"name": "acme.stolen", "path": str(server.uploads / "globex" / "max_digit")},
                    headers=admin)
    assert r.status_code == 403 and "globex" not in r.json()["error"]["message"].split("roots")[1]
    r = server.post("/v1/experts", json={"name": "globex.evil", "path": source}, headers=admin)
    assert r.status_code == 403 and "acme.<name>" in r.json()["error"]["message"]
    assert server.post("/v1/experts", json={"name": "plain", "path": source}, headers=admin).status_code == 403
    assert server.post("/v1/experts", json={"name": "acme.new", "path": source},
                       headers=as_(keyset, "acme")).status_code == 403
    gone, missing = (server.delete(f"/v1/experts/{n}", headers=admin) for n in (EXPERTS["globex"], MISSING))
    assert gone.status_code == missing.status_code == 404
    assert gone.text.replace(EXPERTS["globex"], MISSING) == missing.text
    assert server.delete(f"/v1/experts/{PUBLIC}", headers=admin).status_code == 403
    r = server.post("/v1/load_lora_adapter", json={"lora_name": "globex.x", "lora_path": source}, headers=admin)
    assert r.status_code == 403
    r = server.post("/v1/experts", json={"name": "acme.new", "path": source, "exemplars": ["x y"]}, headers=admin)
    assert r.status_code == 201, r.text
    assert "acme.new" not in server.get("/v1/models", headers=as_(keyset, "globex")).text
    assert "acme.new" in server.get("/v1/models", headers=as_(keyset, "acme")).text
    root = server.get("/v1/models", headers=as_(keyset, "root")).text
    assert all(n in root for n in (*EXPERTS.values(), PUBLIC, HIDDEN, "acme.new"))
    assert server.delete("/v1/experts/acme.new", headers=admin).status_code == 200
    audit = [json.loads(line) for line in server.audit.read_text().splitlines()]
    events = [(e["event"], e.get("expert"), e["tenant"]) for e in audit]
    assert ("register", "acme.new", "acme") in events and ("delete", "acme.new", "acme") in events
    registered = next(e for e in audit if e["event"] == "register")
    assert registered["key_id"] == keyset["acme-admin"][1].id and registered["sha256"]


def test_named_recipes_are_scoped(server, keyset):
    admin = as_(keyset, "acme-admin")
    bad = server.post("/v1/recipes", json={"name": "acme.mix", "recipe": f"0.5*acme.vowels+0.5*{EXPERTS['globex']}"},
                      headers=admin)
    assert bad.status_code == 400 and "globex" not in bad.text.replace(EXPERTS["globex"], "")   # only as it was sent
    assert server.post("/v1/recipes", json={"name": "globex.mix", "recipe": "acme.vowels"},
                       headers=admin).status_code == 403
    ok = server.post("/v1/recipes", json={"name": "acme.mix", "recipe": f"0.5*acme.vowels+0.5*{PUBLIC}"},
                     headers=admin)
    assert ok.status_code == 201, ok.text
    globex = as_(keyset, "globex")
    assert "acme.mix" not in server.get("/v1/recipes", headers=globex).text
    assert server.post("/v1/chat/completions", json={"model": "acme.mix", **CHAT}, headers=globex).status_code == 404
    assert server.post("/v1/chat/completions", json={"model": "acme.mix", **CHAT},
                       headers=as_(keyset, "acme")).status_code == 200
    assert server.delete("/v1/recipes/acme.mix", headers=as_(keyset, "globex-admin")).status_code == 404
    assert server.delete("/v1/recipes/acme.mix", headers=admin).status_code == 200


def test_auto_never_crosses_tenants(server, keyset):
    """acme sends globex's exemplar word for word: the router looks at acme's and public experts only."""
    for path, body in (("/v1/route", {"model": "auto", "prompt": SECRET_PROMPT}),
                       ("/v1/chat/completions", {"model": "auto", "messages": [{"role": "user",
                                                                                 "content": SECRET_PROMPT}],
                                                 "max_tokens": 2})):
        r = server.post(path, json=body, headers=as_(keyset, "acme"))
        assert r.status_code == 200, r.text
        assert "globex" not in r.text and HIDDEN not in r.text
    route = server.post("/v1/route", json={"model": "auto", "prompt": SECRET_PROMPT}, headers=as_(keyset, "acme"))
    assert set(route.json()["route"]["scores"]) <= {"acme.vowels", PUBLIC}
    assert route.json()["recipe"] != "base" and "acme.vowels" in route.json()["weights"]
    mine = server.post("/v1/route", json={"model": "auto", "prompt": SECRET_PROMPT}, headers=as_(keyset, "globex"))
    assert mine.json()["weights"] == {"globex.vowels": 1.0} and mine.json()["route"]["distance"] < 0.01
    none = server.post("/v1/route", json={"model": "auto", "prompt": "What is the largest digit?"},
                       headers=as_(keyset, "initech"))   # initech owns nothing: only the public expert
    assert set(none.json()["weights"]) <= {PUBLIC}


def test_unknown_keys_and_ops(server, keyset):
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": f"Bearer {keyset['acme'][0]}x"}):
        assert server.get("/v1/models", headers=headers).status_code == 401
    assert server.get("/metrics", headers=as_(keyset, "acme")).status_code == 403
    assert server.get("/metrics").status_code == 401
    metrics = server.get("/metrics", headers=as_(keyset, "root"))
    assert metrics.status_code == 200 and "deltaserve_tenant_requests_total" in metrics.text
    assert server.get("/health").status_code == 200


def test_limits_per_key(server, keyset):
    slow = as_(keyset, "slow")
    codes = [server.get("/v1/models", headers=slow).status_code for _ in range(3)]
    assert codes == [200, 200, 429]
    r = server.get("/v1/models", headers=slow)
    assert r.json()["error"]["type"] == "rate_limit_exceeded" and 1 <= int(r.headers["retry-after"]) <= 60
    assert r.headers["x-request-id"]
    assert server.get("/v1/models", headers=as_(keyset, "acme")).status_code == 200   # same tenant, other key
    frugal = as_(keyset, "frugal")
    first = server.post("/v1/chat/completions", json={"model": EXPERTS["globex"], **CHAT}, headers=frugal)
    assert first.status_code == 200 and first.json()["usage"]["total_tokens"] >= 5
    r = server.post("/v1/chat/completions", json={"model": EXPERTS["globex"], **CHAT}, headers=frugal)
    assert r.status_code == 429 and "tokens per minute" in r.json()["error"]["message"]
    metrics = server.get("/metrics", headers=as_(keyset, "root")).text
    assert 'deltaserve_tenant_rejections_total{limit="tpm",tenant="globex"} 1.0' in metrics
    assert 'deltaserve_tenant_rejections_total{limit="rpm",tenant="acme"}' in metrics


def test_limiter_windows():
    now = [0.0]
    limiter = Limiter(clock=lambda: now[0])
    caller = Caller(key_id="k", tenant="t", role="inference", rpm=2, tpm=10, max_in_flight=1)
    assert limiter.check(caller) is None
    assert limiter.check(caller) == ("in_flight", 1.0)
    limiter.release(caller)
    now[0] = 10.0
    assert limiter.check(caller) is None
    limiter.release(caller)
    assert limiter.check(caller)[0] == "rpm" and limiter.check(caller)[1] == pytest.approx(50.0)
    now[0] = 60.5   # the first start has left the window
    assert limiter.check(caller) is None
    limiter.release(caller)
    limiter.charge(caller, 12)
    now[0] = 80.0
    limit, wait = limiter.check(caller)
    assert limit in ("rpm", "tpm")
    now[0] = 141.0
    assert limiter.check(caller) is None


def test_reload_and_bad_file(server, keyset, caplog):
    fresh, entry = make_key("acme")
    headers = {"authorization": f"Bearer {fresh}"}
    assert server.get("/v1/models", headers=headers).status_code == 401
    text = server.key_file.read_text()
    server.key_file.write_text(text + keys_toml([entry], [PUBLIC]).split("\n", 1)[1])
    time.sleep(0.01)
    assert server.get("/v1/models", headers=headers).status_code == 200
    with caplog.at_level(logging.DEBUG):
        server.key_file.write_text("public = [\n")   # not TOML
        time.sleep(0.01)
        assert server.get("/v1/models", headers=headers).status_code == 200   # the previous keys stay
        assert any("not reloaded" in r.getMessage() for r in caplog.records)
        server.key_file.write_text('[[keys]]\nid = "abcd"\nhash = "$argon2id$x"\nrole = "inference"\n')
        time.sleep(0.01)
        assert server.get("/v1/models", headers=headers).status_code == 200
    logged = "\n".join(r.getMessage() for r in caplog.records) + server.audit.read_text()
    for key, entry in keyset.values():
        assert key not in logged and entry.hash not in logged
    assert fresh not in logged and "needs a tenant" in logged


def test_routers_score_only_allowed_experts():
    """knn and gate search only the allowed experts' exemplars (distance included); uncertainty scores only them."""
    from deltaserve.router.gate import GateRouter
    from deltaserve.router.uncertainty import UncertaintyRouter

    exemplars = {"a.x": ["red apple pie"], "b.y": ["blue whale song"], "pub": ["green tea leaf"]}
    for router in (KnnRouter(WordsEncoder(), k=2), GateRouter(WordsEncoder())):
        router.fit(exemplars)
        (everything, near), = router.score(["blue whale song"])
        assert max(everything, key=everything.get) == "b.y" and near < 1e-6
        (scores, distance), = router.score(["blue whale song"], allowed=frozenset({"a.x", "pub"}))
        assert set(scores) <= {"a.x", "pub"} and sum(scores.values()) == pytest.approx(1.0) and distance > 0.1
        assert router.score(["blue whale song"], allowed=frozenset({"nothing"})) == [({}, None)]
    seen = []
    uncertainty = UncertaintyRouter(lambda texts, names: seen.append(list(names)) or np.zeros((len(texts), len(names))))
    uncertainty.fit(exemplars)
    (scores, _), = uncertainty.score(["x"], allowed=frozenset({"pub"}))
    assert scores == {"pub": 1.0} and seen == [["pub"]]


def test_keys_cli_and_a_bad_key_file_at_start(tmp_path, micro_zoo, capsys):
    """`deltaserve keys new/list/revoke` keep a valid file (hashes only); `serve` refuses a bad one in one line."""
    from deltaserve.server.cli import main
    from deltaserve.server.tenants import parse_key_file

    path = tmp_path / "keys.toml"
    assert main(["keys", "new", "--key-file", str(path), "--tenant", "acme", "--role", "admin", "--rpm", "5"]) == 0
    key = capsys.readouterr().out.strip()
    assert main(["keys", "new", "--key-file", str(path), "--role", "global_admin", "--name", 'ops "root"']) == 0
    capsys.readouterr()
    config = parse_key_file(path)
    assert [(k.tenant, k.role, k.rpm) for k in config.keys] == [("acme", "admin", 5), (None, "global_admin", 0)]
    assert key.startswith(f"dsk_{config.keys[0].id}_") and key not in path.read_text()
    assert main(["keys", "list", "--key-file", str(path)]) == 0
    assert "$argon2" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="needs a tenant"):
        main(["keys", "new", "--key-file", str(path), "--role", "inference"])
    assert main(["keys", "revoke", config.keys[0].id, "--key-file", str(path)]) == 0
    assert [k.role for k in parse_key_file(path).keys] == ["global_admin"]
    path.write_text("keys = [\n")
    code = main(["serve", "--base", str(micro_zoo.layout.base), "--store", str(tmp_path / "store"),
                 "--key-file", str(path)])
    assert code == 2 and "is not TOML" in capsys.readouterr().err


def test_an_engine_restart_makes_the_router_read_every_expert_again(server):
    """What the router cached per expert (its serving path among it) is read again after an engine restart
    (server.service.Service.after_restart, the supervisor's hook): the path may differ after a restart."""
    service = server.app.state.service
    before = dict(service._read)
    assert before
    server.portal.call(service.after_restart)
    assert set(service._read) == set(before) and all(service._read[n] is not before[n] for n in before)
