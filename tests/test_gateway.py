"""The Kubernetes inference gateway's contract (GIE's Model Server Protocol, read by llm-d Router's endpoint picker
through the custom engine mapping in helm/deltaserve/files/llm-d-router-values.yaml), through the real engine:
one recipes-info series whose running set is the resident set across dense swaps and LoRA adapter loads, the
scheduler's waiting/running gauges, vLLM's KV-cache metrics beside deltaserve's, comma-free recipe IDs and named
recipes listed under their names."""

from __future__ import annotations

import concurrent.futures as cf
import time

from prometheus_client.parser import text_string_to_metric_families

INFO = "deltaserve_recipe_requests_info"


def scrape(client) -> dict[str, list]:
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    return {f.name: f.samples for f in text_string_to_metric_families(r.text)}


def info(client) -> tuple[list[str], list[str], int]:
    """(running, waiting, max_lora) of the one recipes-info series."""
    samples = scrape(client)[INFO]
    assert len(samples) == 1, samples
    labels = samples[0].labels
    assert abs(samples[0].value - time.time()) < 60   # the time of the snapshot, as vllm:lora_requests_info

    def ids(text: str) -> list[str]:
        return [x for x in text.split(",") if x]
    return ids(labels["running_lora_adapters"]), ids(labels["waiting_lora_adapters"]), int(labels["max_lora"])


def ask(client, model: str, tokens: int = 2, **extra) -> dict:
    r = client.post("/v1/completions", json={"model": model, "prompt": "The capital of France is",
                                             "max_tokens": tokens, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def test_recipes_info_follows_what_is_resident(real_server):
    with real_server.client() as c:
        families = scrape(c)
        assert families["vllm:kv_cache_usage_perc"] and families["vllm:cache_config_info"]
        assert 0.0 <= families["vllm:kv_cache_usage_perc"][0].value <= 1.0   # a fraction, as the picker reads it
        for name in ("deltaserve_num_requests_waiting", "deltaserve_num_requests_running"):
            assert len(families[name]) == 1 and not families[name][0].labels
        ask(c, "random-lora")
        running, waiting, slots = info(c)
        assert "random-lora" in running and slots >= 2 and not waiting
        ask(c, "random-sparse")   # dense path: the weights hold it, the only recipe servable without a swap
        assert info(c) == (["random-sparse"], [], 1)
        recipe = "dare_ties(density=0.5,seed=3):random-sparse+random-sparse-2"
        served = ask(c, recipe)["deltaserve"]["recipe"]
        assert served == "dare_ties(density=0.5;seed=3):random-sparse+random-sparse-2"
        running, _, _ = info(c)
        assert served in running and "random-sparse" not in running   # one dense recipe at a time
        base = next(m["id"] for m in c.get("/v1/models").json()["data"] if m["deltaserve"]["kind"] == "base")
        ask(c, base)
        running, _, slots = info(c)
        assert served not in running and "random-lora" in running and slots > 1   # the base weights: the adapters
        assert all("," not in sample.labels.get("recipe", "") for sample in scrape(c)["deltaserve_requests"])

        def arrivals() -> dict[str, float]:
            return {s.labels["resident"]: s.value for s in scrape(c)["deltaserve_recipe_arrivals"]
                    if s.name.endswith("_total")}
        before = arrivals()
        ask(c, "random-lora")   # resident: its adapter is cached and the weights are the base's
        ask(c, "random-sparse")  # not resident: a swap
        after = arrivals()
        assert (after["true"] - before["true"], after["false"] - before["false"]) == (1, 1)


def test_named_recipe_is_listed_resident_under_its_name(real_server):
    with real_server.client() as c:
        r = c.post("/v1/recipes", json={"name": "support-bot", "recipe": "0.7*random-lora+0.3*random-lora-2"})
        assert r.status_code == 201, r.text
        try:
            assert "support-bot" in {m["id"] for m in c.get("/v1/models").json()["data"]}
            out = ask(c, "support-bot")
            assert out["deltaserve"]["recipe"] == "0.7*random-lora+0.3*random-lora-2"
            running, _, _ = info(c)
            assert {"support-bot", "0.7*random-lora+0.3*random-lora-2"} <= set(running)
        finally:
            assert c.delete("/v1/recipes/support-bot").status_code == 200


def test_scheduler_gauges_count_held_requests(real_server):
    """A request for another dense recipe waits in deltaserve's scheduler while one runs: the gauges and the
    waiting adapters say so, and both are back to zero after."""
    with real_server.client() as c, cf.ThreadPoolExecutor(2) as pool:
        ask(c, "random-sparse")
        long = pool.submit(ask, c, "random-sparse", 400, ignore_eos=True)
        deadline = time.time() + 60
        while scrape(c)["deltaserve_num_requests_running"][0].value < 1 and time.time() < deadline:
            time.sleep(0.05)
        other = pool.submit(ask, c, "random-sparse-2")
        seen = None
        while time.time() < deadline and not long.done():
            families = scrape(c)
            if families["deltaserve_num_requests_waiting"][0].value >= 1:
                seen = families
                break
            time.sleep(0.05)
        assert seen is not None, "the second dense recipe never waited while the first ran"
        assert seen["deltaserve_num_requests_running"][0].value >= 1
        assert "random-sparse-2" in seen[INFO][0].labels["waiting_lora_adapters"].split(",")
        long.result(), other.result()
        families = scrape(c)
        assert families["deltaserve_num_requests_waiting"][0].value == 0
        assert families["deltaserve_num_requests_running"][0].value == 0
