"""Thousands of experts in one replica: registration, cold start, memory, listing, routing and long-tail serving.

Grows one store on the real base (SmolLM2-135M-Instruct) to each of ``--sizes`` experts (default 10, 100,
1,000, 10,000) through the public API, then restarts the server on it and measures, per size:

* **registration** (``POST /v1/experts``, router refit included): experts/s from one client for the first
  half of the new experts and from 8 concurrent clients for the second half, while a probe sends lone
  ``/v1/route`` requests; the probe's p99 during registration vs its p99 on the idle server at that size;
* the server's **refresh cost** per registration (``deltaserve_store_refresh_seconds``: the engine's store scan
  and the router's refit);
* **cold start** (process start to ``/health`` 200) and **RSS** of the API server and of its engine processes;
* ``GET /v1/models`` and ``GET /v1/experts`` latency (p50) and bytes;
* **routing** ``/v1/route`` (knn on MiniLM features) p50/p99, lone and 32 concurrent;
* **long-tail serving**: ``--requests`` chat requests whose ``model`` is drawn Zipf(``--zipf``) over every expert,
  vs the same requests all on one expert, in the same server: tokens/s ratio and the merged-adapter cache's hit
  rate (``deltaserve_cache_hits_total{tier="device"}`` vs ``deltaserve_merged_adapter_builds_total``).

The experts are random rank-``--rank`` LoRAs on q_proj and v_proj (zoo.real.synthetic's kind, written straight
as safetensors from one PEFT template: milliseconds each), each with two exemplar prompts drawn without
replacement from a pool of distinct generated prompts. A source folder is deleted once registered (the store
keeps its own copy).

    .venv/bin/python -m bench.scale.experts --out results/scale/experts.json
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
from typing import Any

from bench.common import log, p99, provenance, scrape
from bench.servers import start_server, stop_server

TOPICS = ("invoices", "dates", "recipes", "poems", "SQL", "emails", "tickets", "contracts", "tweets", "units",
          "addresses", "logs", "reviews", "lyrics", "receipts", "menus", "timetables", "patents", "memos", "jokes")
VERBS = ("Summarise", "Translate", "Classify", "Extract the totals from", "Rewrite", "Check the grammar of",
         "Convert", "Sort", "Explain", "Shorten", "Turn into JSON", "Find the dates in")
SERVER_FLAGS = ["--max-model-len", "512", "--router", "knn", "--kv-cache-gib", "1", "--max-lora-rank", "8",
                "--max-loras", "8"]   # as many LoRAs per batch as requests in flight: a long tail has 8 distinct
SINGLE_CLIENT = 200   # registrations from one client per size; the rest from 8 concurrent clients


def prompt_pool(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct prompts (verb × topic × a numbered subject), shuffled."""
    rng = random.Random(seed)
    pool = [f"{VERBS[i % len(VERBS)]} these {TOPICS[(i // len(VERBS)) % len(TOPICS)]} for customer {i}: "
            f"item {rng.randrange(10_000)} of batch {i // 240}." for i in range(n)]
    rng.shuffle(pool)
    return pool


class LoraFactory:
    """Random PEFT LoRAs shaped like one template made by PEFT (adapter_config.json copied, tensors redrawn)."""

    def __init__(self, base: Path, work: Path, rank: int) -> None:
        from safetensors.torch import load_file

        from deltaserve_zoo.real.synthetic import random_lora

        self.template = random_lora(base, work / "template", rank=rank, targets=("q_proj", "v_proj"))
        self.config = (self.template / "adapter_config.json").read_text()
        self.tensors = load_file(self.template / "adapter_model.safetensors")

    def write(self, out: Path, seed: int) -> Path:
        import torch
        from safetensors.torch import save_file

        gen = torch.Generator().manual_seed(seed)
        out.mkdir(parents=True)
        (out / "adapter_config.json").write_text(self.config)
        save_file({k: torch.randn(t.shape, generator=gen) * t.std() for k, t in self.tensors.items()},
                  out / "adapter_model.safetensors")
        return out


async def register_all(url: str, jobs: list[tuple[str, Path, list[str]]], concurrency: int) -> float:
    """POST every ``(name, source, exemplars)``, ``concurrency`` in flight; returns the wall seconds."""
    import httpx

    queue = list(reversed(jobs))

    async def worker(client: httpx.AsyncClient) -> None:
        while queue:
            name, source, exemplars = queue.pop()
            r = await client.post("/v1/experts", json={"name": name, "path": str(source), "exemplars": exemplars})
            if r.status_code != 201:
                raise SystemExit(f"registering {name}: HTTP {r.status_code} {r.text[:400]}")
            _remove(source)

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return time.perf_counter() - start


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


async def route_latencies(url: str, prompts: list[str], concurrency: int, stop: asyncio.Event | None = None,
                          gap_s: float = 0.0) -> list[float]:
    """``/v1/route`` latencies (s) of ``prompts``, ``concurrency`` in flight (until ``stop`` is set, cycling)."""
    import httpx

    out: list[float] = []
    it = iter(prompts) if stop is None else _cycle(prompts)

    async def worker(client: httpx.AsyncClient) -> None:
        for prompt in it:
            if stop is not None and stop.is_set():
                return
            start = time.perf_counter()
            r = await client.post("/v1/route", json={"model": "auto", "prompt": prompt})
            out.append(time.perf_counter() - start)
            if r.status_code != 200:
                raise SystemExit(f"/v1/route: HTTP {r.status_code} {r.text[:400]}")
            if gap_s:
                await asyncio.sleep(gap_s)

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return out


def _cycle(items: list[str]):
    while True:
        yield from items


async def grow(url: str, jobs: list[tuple[str, Path, list[str]]], probe: list[str]) -> dict[str, Any]:
    """Register ``jobs`` (the first half, at most SINGLE_CLIENT, from one client, the rest from 8) while a lone
    ``/v1/route`` probe runs."""
    half = min(len(jobs) // 2, SINGLE_CLIENT)
    stop = asyncio.Event()
    probing = asyncio.create_task(route_latencies(url, probe, 1, stop, gap_s=0.05))
    single = await register_all(url, jobs[:half], 1) if half else 0.0
    concurrent = await register_all(url, jobs[half:], 8)
    stop.set()
    during = await probing
    return {"registered": len(jobs), "single_per_s": round(half / single, 1) if half else None,
            "concurrent8_per_s": round((len(jobs) - half) / concurrent, 1),
            "probe_during_p50_ms": ms(statistics.median(during)), "probe_during_p99_ms": ms(p99(during)),
            "probe_during_max_ms": ms(max(during)), "probes_during": len(during)}


def ms(seconds: float) -> float:
    return round(1000 * seconds, 1)


def timed_get(url: str, path: str, repeat: int) -> tuple[float, int]:
    """(p50 ms, bytes) of ``GET path``."""
    import httpx

    times, size = [], 0
    with httpx.Client(base_url=url, timeout=600) as client:
        for _ in range(repeat):
            start = time.perf_counter()
            r = client.get(path)
            times.append(time.perf_counter() - start)
            r.raise_for_status()
            size = len(r.content)
    return ms(statistics.median(times)), size


def rss_mib(pid: int) -> tuple[float, float]:
    """(RSS of ``pid``, summed RSS of its descendants) in MiB."""
    import psutil

    proc = psutil.Process(pid)
    children = sum(c.memory_info().rss for c in proc.children(recursive=True))
    return round(proc.memory_info().rss / 2**20, 1), round(children / 2**20, 1)


def device_counters(url: str) -> tuple[float, float]:
    """(merged-adapter cache hits, merged-adapter builds) so far."""
    m = scrape(url)
    hits = m.get('deltaserve_cache_hits_total{tier="device"}', 0.0)
    return hits, m.get("deltaserve_merged_adapter_builds_total", 0.0)


def long_tail(url: str, names: list[str], prompts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Zipf(s) over every expert vs every request on one expert: tokens/s side by side, cache hit rate."""
    from bench.common import post_chats

    rng = random.Random(args.seed)
    ranked = rng.sample(names, len(names))
    weights = [1.0 / (k + 1) ** args.zipf for k in range(len(ranked))]
    zipf = rng.choices(ranked, weights, k=args.requests)
    asks = [rng.choice(prompts) for _ in range(args.requests)]
    out: dict[str, Any] = {"requests": args.requests, "distinct_experts": len(set(zipf))}
    single = [ranked[0]] * args.requests
    for label, models in (("single", single), ("zipf", zipf), ("single_again", single)):
        jobs = [(i, {"model": m, "messages": [{"role": "user", "content": p}], "max_tokens": args.max_tokens,
                     "ignore_eos": True, "temperature": 0}) for i, (m, p) in enumerate(zip(models, asks))]
        hits0, builds0 = device_counters(url)
        done, wall = asyncio.run(post_chats(url, jobs, args.concurrency))
        hits1, builds1 = device_counters(url)
        tokens = sum(r["usage"]["completion_tokens"] for _, r, _ in done)
        hits, builds = hits1 - hits0, builds1 - builds0
        out[label] = {"tokens_per_s": round(tokens / wall, 1), "wall_s": round(wall, 2),
                      "adapter_hit_rate": round(hits / (hits + builds), 3) if hits + builds else None,
                      "adapter_builds": int(builds)}
    single_rate = statistics.mean([out["single"]["tokens_per_s"], out["single_again"]["tokens_per_s"]])
    out["zipf_vs_single"] = round(out["zipf"]["tokens_per_s"] / single_rate, 2)
    return out


def measure(base: Path, store: Path, work: Path, size: int, names: list[str], prompts: list[str],
            args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """Start a server on the store of ``size`` experts and measure it (the server is left running)."""
    started = time.perf_counter()
    server, url = start_server(base, store, work / f"serve-{size}.log", [*SERVER_FLAGS, "--register-root", str(work)])
    row: dict[str, Any] = {"experts": size, "cold_start_s": round(time.perf_counter() - started, 1)}
    row["server_rss_mib"], row["engine_rss_mib"] = rss_mib(server.proc.pid)
    row["models_ms"], row["models_bytes"] = timed_get(url, "/v1/models", 20)
    row["experts_ms"], row["experts_bytes"] = timed_get(url, "/v1/experts", 5)
    queries = prompts[:256]
    asyncio.run(route_latencies(url, queries[:16], 1))   # warm-up
    lone = asyncio.run(route_latencies(url, queries[:64], 1))
    busy = asyncio.run(route_latencies(url, queries, 32))
    row.update(route_lone_p50_ms=ms(statistics.median(lone)), route_lone_p99_ms=ms(p99(lone)),
               route_32_p50_ms=ms(statistics.median(busy)), route_32_p99_ms=ms(p99(busy)))
    if args.requests:
        row["long_tail"] = long_tail(url, names, prompts, args)
    return server, row


def refresh_costs(url: str) -> dict[str, float]:
    """Mean seconds per store refresh so far, by part (engine scan, router refit)."""
    m = scrape(url)
    out = {}
    for part in ("engine", "router"):
        count = m.get(f'deltaserve_store_refresh_seconds_count{{part="{part}"}}', 0.0)
        total = m.get(f'deltaserve_store_refresh_seconds_sum{{part="{part}"}}', 0.0)
        out[f"refresh_{part}_ms"] = ms(total / count) if count else None
    return out


def run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from deltaserve_zoo.real.build import RealSuiteBuilder

    from bench.common import REPO

    builder = RealSuiteBuilder(REPO / ".cache" / "zoo" / "real")
    builder.build_base()
    base = builder.layout.base
    store = work / "store"
    factory = LoraFactory(base, work, args.rank)
    pool = prompt_pool(2 * max(args.sizes) + 512, args.seed)
    probe, pool = pool[:512], pool[512:]
    server, url = start_server(base, store, work / "serve-grow.log", [*SERVER_FLAGS, "--register-root", str(work)])
    rows, names = [], []
    try:
        for size in sorted(args.sizes):
            idle = asyncio.run(route_latencies(url, probe[:200], 1)) if names else None
            new = [f"x{i:05d}" for i in range(len(names), size)]
            log(f"writing {len(new)} LoRAs for {size} experts")
            jobs = [(n, factory.write(work / "src" / n, i), pool[2 * i:2 * i + 2])
                    for i, n in zip(range(len(names), size), new)]
            log(f"registering {len(new)} experts")
            row: dict[str, Any] = {"grow": asyncio.run(grow(url, jobs, probe))}
            if idle:
                row["grow"].update(probe_idle_p99_ms=ms(p99(idle)),
                                   probe_spike=round(row["grow"]["probe_during_p99_ms"] / ms(p99(idle)), 2))
            row["grow"].update(refresh_costs(url))
            names += new
            stop_server(server)
            server, measured = measure(base, store, work, size, names, probe, args)
            url = server.url
            rows.append({**measured, **row})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        stop_server(server)
    return rows


def table(rows: list[dict[str, Any]]) -> None:
    head = ("experts", "reg/s 1", "reg/s 8", "spike", "start s", "srv MiB", "eng MiB", "models ms", "models KB",
            "route p50", "route p99", "r32 p50", "tail x", "hit")
    print(" ".join(f"{h:>9}" for h in head))
    for r in rows:
        g, t = r["grow"], r.get("long_tail", {})
        cells = (r["experts"], g["single_per_s"], g["concurrent8_per_s"], g.get("probe_spike"), r["cold_start_s"],
                 r["server_rss_mib"], r["engine_rss_mib"], r["models_ms"], round(r["models_bytes"] / 1024),
                 r["route_lone_p50_ms"], r["route_lone_p99_ms"], r["route_32_p50_ms"], t.get("zipf_vs_single"),
                 (t.get("zipf") or {}).get("adapter_hit_rate"))
        print(" ".join(f"{'-' if c is None else c:>9}" for c in cells))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10_000])
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--requests", type=int, default=96, help="long-tail requests per stream (0: skip)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, help="keep the store here (default: a temporary folder)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = run(args, work)
    table(rows)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**provenance(argv=argv), "settings": {k: str(v) for k, v in vars(args).items()},
                                        "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
