"""Recipe-affine placement vs round robin over N deltaserve replicas on this machine.

Starts N replicas of ``deltaserve serve`` (the real base, SmolLM2-135M-Instruct, one CPU core each through
``VLLM_CPU_OMP_THREADS_BIND``) on one shared store of 4 random sparse experts (zoo.real.synthetic; what they
learned does not matter to placement), then sends the same request stream twice per round:

* **round robin**: request i to replica i mod N (a plain Kubernetes Service);
* **affine**: each request to the replica the endpoint picker's rules choose from the replicas' ``/metrics``
  at dispatch time (bench/serving/epp.py: the lora-affinity, queue and KV-cache scorers with the weights and the
  engine mapping of deploy/gateway/llm-d-router-values.yaml; a measurement harness, not a product router).

Two scenarios (``--scenario``), each a stream of ``--requests`` chat requests drawn Zipf(``--zipf``) by rank,
``--concurrency`` in flight (closed loop), ``--max-tokens`` tokens each:

* **dense**: 8 dense-path recipes (the 4 sparse experts and four 50/50 pairs); a replica holds one at a time,
  so every recipe change is a weight swap;
* **lora**: 8 LoRA-path recipes (the 4 random LoRAs and four 50/50 pairs) on replicas whose merged-adapter
  cache holds 4 (``--adapter-cache-size 4``, adaptive merging off): the pool holds every recipe, one replica
  half of them, so a recipe on the wrong replica costs an adapter build.

Every run starts with every replica back on the base weights; merged adapters stay cached from run to run
(the policies alternate, so each starts from the caches the other left). Reports, per policy: requests/s, tokens/s,
p50/p99 latency, swaps per request (dense swaps plus merged-adapter builds) and the affinity hit rate
(``deltaserve_recipe_arrivals_total``: the recipe was resident on its replica on arrival), and the
affine/round-robin ratios of the same round.

    .venv/bin/python -m bench.serving.gateway --out results/serving/gateway.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import REPO, p99, provenance
from bench.serving import epp
from bench.servers import start_server, stop_server

def recipes(kind: str) -> list[str]:
    """8 recipes over the 4 synthetic experts of ``kind`` (sparse or lora): each alone, and four 50/50 pairs."""
    e = [f"{kind}-{i}" for i in range(4)]
    return [*e, *(f"0.5*{e[i]}+0.5*{e[(i + 1) % 4]}" for i in range(4))]


SCENARIOS = {   # name -> (recipes, server flags)
    "dense": (recipes("sparse"), []),
    "lora": (recipes("lora"), ["--adapter-cache-size", "4", "--max-loras", "4", "--max-lora-rank", "16",
                               "--adaptive-merge", "off"]),
}


def stream(names: list[str], n: int, s: float, seed: int, prompts: list[str]) -> list[tuple[str, str]]:
    """``n`` (recipe, prompt) pairs: recipes Zipf(s) by their rank in ``names``, prompts uniform."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** s for k in range(len(names))]
    return [(rng.choices(names, weights)[0], rng.choice(prompts)) for _ in range(n)]


def counters(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("deltaserve_weight_swaps_total", "deltaserve_merged_adapter_builds_total"):
                out["swaps"] = out.get("swaps", 0.0) + sample.value
            elif sample.name == "deltaserve_recipe_arrivals_total":
                out["resident_" + sample.labels["resident"]] = sample.value
    return out


async def run(urls: list[str], requests: list[tuple[str, str]], policy: str, concurrency: int, max_tokens: int,
              seed: int) -> dict:
    import httpx

    mapping, weights = epp.picker_config()
    rng = random.Random(seed)
    queue: asyncio.Queue = asyncio.Queue()
    for item in requests:
        queue.put_nowait(item)
    latencies: list[float] = []
    placed = [0] * len(urls)
    dispatched = 0
    async with httpx.AsyncClient(timeout=600) as client:
        async def metrics() -> list[str]:
            return [r.text for r in await asyncio.gather(*(client.get(u + "/metrics") for u in urls))]

        async def choose(model: str) -> int:
            nonlocal dispatched
            if policy == "round_robin":
                dispatched += 1
                return (dispatched - 1) % len(urls)
            endpoints = [epp.parse_endpoint(text, mapping) for text in await metrics()]
            return epp.pick(model, endpoints, weights, rng)

        async def worker() -> None:
            while not queue.empty():
                model, prompt = queue.get_nowait()
                i = await choose(model)
                placed[i] += 1
                start = time.perf_counter()
                r = await client.post(urls[i] + "/v1/chat/completions", json={
                    "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                    "temperature": 0, "ignore_eos": True})
                if r.status_code != 200:
                    raise SystemExit(f"{model!r} on replica {i}: HTTP {r.status_code} {r.text[:300]}")
                latencies.append(time.perf_counter() - start)

        before = [counters(t) for t in await metrics()]
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        after = [counters(t) for t in await metrics()]
    delta = {k: sum(a[k] - b[k] for a, b in zip(after, before)) for k in after[0]}
    n = len(requests)
    return {"policy": policy, "requests": n, "wall_s": round(wall, 2), "requests_per_s": round(n / wall, 3),
            "tokens_per_s": round(n * max_tokens / wall, 2),
            "p50_s": round(statistics.median(latencies), 3), "p99_s": round(p99(latencies), 3),
            "swaps": int(delta["swaps"]), "swaps_per_request": round(delta["swaps"] / n, 3),
            "affinity_hit_rate": round(delta["resident_true"] / max(1.0, delta["resident_true"]
                                                                    + delta["resident_false"]), 3),
            "placed": placed}


async def to_base(urls: list[str], base_name: str) -> None:
    """Every replica back on the base weights (a base request swaps a dense recipe out)."""
    import httpx

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(client.post(u + "/v1/chat/completions", json={
            "model": base_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}) for u in urls))


def serve_scenario(scenario: str, base: Path, work: Path, prompts: list[str], args: argparse.Namespace) -> list[dict]:
    """Start the replicas for ``scenario``, warm them up, run round robin and affine ``args.rounds`` times."""
    import httpx

    names, flags = SCENARIOS[scenario]
    servers = [start_server(base, work / "store", work / f"{scenario}-replica-{i}.log",
                            ["--max-model-len", "512", "--router", "none", "--kv-cache-gib", "1", *flags],
                            env={"VLLM_CPU_OMP_THREADS_BIND": str(i % 2)}, wait=False)[0]
               for i in range(args.replicas)]
    rows = []
    try:
        for server in servers:
            server.wait_healthy(600)
        urls = [s.url for s in servers]
        base_name = next(m["id"] for m in httpx.get(urls[0] + "/v1/models").json()["data"]
                         if m["deltaserve"]["kind"] == "base")
        warm = stream(names, 4 * args.concurrency, args.zipf, args.seed + 1000, prompts)
        asyncio.run(run(urls, warm, "round_robin", args.concurrency, args.max_tokens, args.seed))
        requests = stream(names, args.requests, args.zipf, args.seed, prompts)
        for r in range(args.rounds):
            for policy in ("round_robin", "affine"):
                asyncio.run(to_base(urls, base_name))
                row = asyncio.run(run(urls, requests, policy, args.concurrency, args.max_tokens, args.seed + r))
                row.update(scenario=scenario, round=r)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        for server in servers:
            stop_server(server)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=[*SCENARIOS, "both"], default="both")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--requests", type=int, default=160)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--rounds", type=int, default=2, help="round robin then affine, this many times")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", type=Path, help="a base model directory (default: the real base, converted once)")
    ap.add_argument("--out", type=Path, help="write the results here (JSON)")
    args = ap.parse_args()

    from deltaserve_zoo.real.build import RealSuiteBuilder
    from deltaserve_zoo.real.synthetic import publish_synthetic

    from bench.serving.traffic import synthetic_prompts

    base = args.base
    if base is None:
        builder = RealSuiteBuilder(REPO / ".cache" / "zoo" / "real")
        builder.build_base()
        base = builder.layout.base
    prompts = [p for skill in synthetic_prompts(args.seed) for p in skill]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ds-gateway-") as tmp:
        work = Path(tmp)
        publish_synthetic(base, work / "store", work / "synthetic")
        for scenario in (SCENARIOS if args.scenario == "both" else [args.scenario]):
            rows += serve_scenario(scenario, base, work, prompts, args)
    ratios = []
    for scenario in dict.fromkeys(row["scenario"] for row in rows):
        for r in range(args.rounds):
            rr, affine = (next(x for x in rows if (x["scenario"], x["round"], x["policy"]) == (scenario, r, p))
                          for p in ("round_robin", "affine"))
            ratios.append({"scenario": scenario, "round": r,
                           "throughput_x": round(affine["requests_per_s"] / rr["requests_per_s"], 2),
                           "fewer_swaps_x": round(rr["swaps"] / max(1, affine["swaps"]), 2),
                           "p50_x": round(affine["p50_s"] / rr["p50_s"], 2),
                           "p99_x": round(affine["p99_s"] / rr["p99_s"], 2)})
    print(f"\n{'scenario':<8} {'round':>5} {'policy':<12} {'req/s':>7} {'p50 s':>7} {'p99 s':>7} {'swaps/req':>9} "
          f"{'hit rate':>8} placed")
    for row in rows:
        print(f"{row['scenario']:<8} {row['round']:>5} {row['policy']:<12} {row['requests_per_s']:>7.3f} "
              f"{row['p50_s']:>7.2f} {row['p99_s']:>7.2f} {row['swaps_per_request']:>9.3f} "
              f"{row['affinity_hit_rate']:>8.3f} {row['placed']}")
    for x in ratios:
        print(f"{x['scenario']} round {x['round']}: affine vs round robin: throughput {x['throughput_x']}x, "
              f"{x['fewer_swaps_x']}x fewer swaps, p50 {x['p50_x']}x, p99 {x['p99_x']}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        settings = vars(args) | {"base": str(base), "out": str(args.out),
                                 "scenarios": {k: {"recipes": v[0], "flags": v[1]} for k, v in SCENARIOS.items()}}
        args.out.write_text(json.dumps({"provenance": provenance(), "settings": settings, "rows": rows,
                                        "ratios": ratios}, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
