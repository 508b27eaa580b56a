"""Soak: many clients, mixed recipes, cancellations, and a registration and a deletion mid-run.

    .venv/bin/python -m bench.reliability.soak --zoo .cache/zoo/micro --clients 64 --seconds 120 \
        --out results/reliability/soak.json

Starts a real ``deltaserve serve`` on the zoo (LoRA and dense experts, knn
router), then ``--clients`` concurrent clients loop over a traffic mix: base,
single and mixed LoRA recipes, single and mixed dense recipes, a TIES merge,
``auto``, streamed requests (some cancelled after the first chunk) and a share
of bad requests. A third of the way in, an expert is registered; at two thirds,
deleted (while clients use it). Writes counts by status, latency p50/p99 of the
200s, server RSS (with the engine's processes) before and after, engine
restarts, and whether the engine is alive at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from bench.common import log, p99, provenance, scrape, seed_store
from bench.servers import start_server, stop_server
from deltaserve.experts.sources import Compression
from deltaserve_zoo.build import ZooLayout
from deltaserve_zoo.tasks import get_task

QUESTION = [{"role": "user", "content": "How many vowels are in: banana split"}]
HOT = "hot-lora"
MIX = [  # (weight, model, stream, cancel)
    (3, "base", False, False), (4, "count-vowels-lora", False, False), (3, "max-digit-lora", True, False),
    (3, "0.5*count-vowels-lora+0.5*max-digit-lora", False, False), (3, "upper", False, False),
    (2, "0.7*upper+0.3*length", False, False), (1, "ties(density=0.3):upper+length", False, False),
    (3, "auto", False, False), (2, "count-vowels-lora", True, True), (2, HOT, False, False),
    (1, "no-such-expert", False, False), (1, "0.5*upper+", False, False),
]


def rss_mb(pid: int) -> float:
    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


async def one(client: httpx.AsyncClient, model: str, stream: bool, cancel: bool) -> tuple[int, float]:
    body = {"model": model, "messages": QUESTION, "max_tokens": 8, "temperature": 0, "stream": stream}
    started = time.perf_counter()
    if not stream:
        r = await client.post("/v1/chat/completions", json=body)
        return r.status_code, time.perf_counter() - started
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        async for _ in r.aiter_lines():
            if cancel:
                return 499, time.perf_counter() - started      # the client went away mid-stream
    return r.status_code, time.perf_counter() - started


async def client_loop(url: str, deadline: float, seed: int, statuses: Counter, latencies: list[float]) -> None:
    rng = random.Random(seed)
    weights = [w for w, *_ in MIX]
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        while time.monotonic() < deadline:
            _, model, stream, cancel = rng.choices(MIX, weights)[0]
            try:
                status, seconds = await one(client, model, stream, cancel)
            except httpx.HTTPError as err:
                status, seconds = f"error:{type(err).__name__}", 0.0
            statuses[str(status)] += 1
            if status == 200:
                latencies.append(seconds)


async def admin_events(url: str, source: Path, seconds: float, events: list[dict]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300) as admin:
        await asyncio.sleep(seconds / 3)
        r = await admin.post("/v1/experts", json={"name": HOT, "path": str(source)})
        events.append({"at_s": round(seconds / 3), "event": f"register {HOT}", "status": r.status_code})
        await asyncio.sleep(seconds / 3)
        r = await admin.delete(f"/v1/experts/{HOT}")
        events.append({"at_s": round(2 * seconds / 3), "event": f"delete {HOT}", "status": r.status_code})


async def soak(url: str, clients: int, seconds: float, hot_source: Path) -> dict:
    statuses: Counter = Counter()
    latencies: list[float] = []
    events: list[dict] = []
    deadline = time.monotonic() + seconds
    await asyncio.gather(admin_events(url, hot_source, seconds, events),
                         *(client_loop(url, deadline, i, statuses, latencies) for i in range(clients)))
    return {"statuses": dict(sorted(statuses.items())), "requests": sum(statuses.values()), "events": events,
            "latency_s": {"p50": statistics.median(latencies) if latencies else None,
                          "p99": p99(latencies) if latencies else None}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=Path(".cache/zoo/micro"))
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    record = provenance(argv=argv)
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    tasks = ["count_vowels", "max_digit", "upper", "length"]
    full = {"": Compression(method="magnitude", density=0.2)}
    seed_store(args.zoo, tmp / "store", tasks, full=full,
               lora_exemplars=lambda t: [e.question for e in get_task(t).examples("calib", 24, seed=1)])
    base = ZooLayout(args.zoo).base
    server, url = start_server(base, tmp / "store", tmp / "server.log",
                               ["--router", "knn", "--register-root", str(args.zoo)])
    try:
        before = rss_mb(server.proc.pid)
        log(f"soak: {args.clients} clients for {args.seconds:.0f} s against {url}")
        result = asyncio.run(soak(url, args.clients, args.seconds, args.zoo / "experts" / "lora" / "min_digit"))
        metrics = scrape(url)
        result.update(rss_mb={"before": round(before, 1), "after": round(rss_mb(server.proc.pid), 1)},
                      engine_restarts=metrics.get("deltaserve_engine_restarts_total", 0.0),
                      healthy_after=httpx.get(url + "/health", timeout=30).status_code == 200,
                      clients=args.clients, seconds=args.seconds)
    finally:
        stop_server(server)
    out = {**record, **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    log(json.dumps(result, indent=2))
    return out


if __name__ == "__main__":
    main()
