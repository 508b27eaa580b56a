"""Router latency under concurrency: one routing call per request vs the micro-batcher.

    .venv/bin/python -m bench.routing.concurrency     # -> results/routing/concurrency.json

The server's router as it runs in the server (one torch thread), on either
encoder the server offers (``router.encoder``: ``minilm``, all-MiniLM-L6-v2 at
the precision ``auto`` picks on this host, the default; ``static``,
router.static.StaticEncoder), knn and gate, at 10, 100 and 1,000 experts (8
exemplars each: the
real suite's exemplar questions, spread over the experts). Queries are the real
suite's held-out test questions, never repeated (the feature cache is cleared
before each row, so every query is encoded). For each size:

* ``single``: one request at a time — the p50 a lone request sees;
* ``C=8`` and ``C=32`` closed-loop clients, two ways: ``per-request`` (each
  request routes alone in a worker thread, as the server did before
  router.batcher) and ``batched`` (router.batcher.RouteBatcher, 2 ms window).

Each latency is the caller's wall time from asking to holding its decision.
The ratios to ``single`` come from the same run (this machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from bench.common import REPO, log, p99, provenance

OUT = REPO / "results" / "routing" / "concurrency.json"


def texts() -> tuple[list[str], list[str]]:
    """(exemplar questions, held-out test questions) of the real suite."""
    from deltaserve_zoo.real.skills import get_skill
    from deltaserve_zoo.real.spec import RealSuiteSpec

    exemplars, queries = [], []
    for name in RealSuiteSpec().skills:
        skill = get_skill(name)
        exemplars += [e.messages[-1][1] for e in skill.examples("calib", 64, seed=11)]
        queries += [e.messages[-1][1] for e in skill.examples("test", 64, seed=5, phrasings="heldout")]
    return exemplars, queries


def build(router_name: str, encoder, n_experts: int, exemplars: list[str]):
    from deltaserve.router import Policy, RoutingService, make_router

    per = 8
    groups = {f"expert-{i:04d}": [exemplars[(i * per + j) % len(exemplars)] + f" ({i})" for j in range(per)]
              for i in range(n_experts)}
    service = RoutingService(make_router(router_name, encoder=encoder), Policy(min_confidence=0.0))
    service.set_exemplars(groups)
    return service


async def closed_loop(route, queries: list[str], clients: int) -> list[float]:
    """``clients`` tasks, each routing its share of ``queries`` one after another; per-request seconds."""
    latencies: list[float] = []

    async def client(mine: list[str]) -> None:
        for q in mine:
            start = time.perf_counter()
            await route(q)
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(client(queries[i::clients]) for i in range(clients)))
    return latencies


def measure(service, encoder, queries: list[str], clients: int, mode: str) -> dict:
    from deltaserve.router.batcher import RouteBatcher

    encoder.clear_cache()
    if mode == "single":
        clients = 1
    if mode == "batched":
        batcher = RouteBatcher(service)
        route = batcher.route
    else:
        async def route(q: str):
            return (await asyncio.to_thread(service.route, [q]))[0]
    started = time.perf_counter()
    lat = asyncio.run(closed_loop(route, queries, clients))
    wall = time.perf_counter() - started
    row = {"mode": mode, "clients": clients, "requests": len(lat), "p50_ms": 1000 * statistics.median(lat),
           "p99_ms": 1000 * p99(lat), "routes_per_s": len(lat) / wall}
    if mode == "batched":
        row["mean_batch"] = batcher.routed / max(batcher.batches, 1)
    return row


def measure_size(encoder_name: str, encoder, router_name: str, n: int, exemplars: list[str],
                 queries: list[str]) -> list[dict]:
    """The five rows (single; per-request and batched at C=8 and 32) of one encoder, router and size."""
    service = build(router_name, encoder, n, exemplars)
    single = measure(service, encoder, queries[: len(queries) // 2], 1, "single")
    rows = [single] + [measure(service, encoder, queries, c, mode)
                       for c in (8, 32) for mode in ("per-request", "batched")]
    for row in rows:
        row.update(encoder=encoder_name, precision=getattr(encoder, "precision", "fp32"), router=router_name,
                   experts=n, p50_vs_single=row["p50_ms"] / single["p50_ms"])
        log(f"{encoder_name} {router_name} {n} experts {row['mode']} C={row['clients']}: p50 {row['p50_ms']:.1f} ms "
            f"({row['p50_vs_single']:.2f}x single), p99 {row['p99_ms']:.1f} ms, {row['routes_per_s']:.0f} routes/s")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--experts", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--routers", nargs="+", default=["knn", "gate"])
    ap.add_argument("--requests", type=int, default=128, help="queries per row")
    from deltaserve.router.features import ENCODERS

    ap.add_argument("--encoders", nargs="+", choices=list(ENCODERS), default=list(ENCODERS))
    args = ap.parse_args(argv)
    record = provenance(argv=argv)
    import torch

    from deltaserve.router.features import make_encoder

    torch.set_num_threads(1)   # as the server runs its router (server.routing)
    exemplars, queries = texts()
    rows = []
    for encoder_name in args.encoders:
        encoder = make_encoder(encoder_name, cache_size=100_000)
        for router_name in args.routers:
            for n in args.experts:
                rows += measure_size(encoder_name, encoder, router_name, n, exemplars, queries[: args.requests])
    print("\n| encoder | router | experts | mode | clients | p50 ms | × single | p99 ms | routes/s |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['encoder']} | {r['router']} | {r['experts']} | {r['mode']} | {r['clients']} | {r['p50_ms']:.1f} | "
              f"{r['p50_vs_single']:.2f} | {r['p99_ms']:.1f} | {r['routes_per_s']:.0f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**record, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
