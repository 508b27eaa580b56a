"""Serving benchmark: one deltaserve build, four traffic mixes, ratios to base-only traffic.

Starts ONE ``deltaserve serve`` on a zoo (demo size by default) with a store of
LoRA experts (exact) and sparse full-rank experts (magnitude 5 %: the same codec
and bytes as NPS 5 %, so the serving cost is the same), then drives, in turn:

  a  base only
  b1 one expert on the dense path (sparse)       b2 one expert on the LoRA path
  c  mixed traffic over 4 LoRA experts (a random expert per request)
  d  mixed traffic over 4 dense recipes (a random recipe per request)
  e  `model: auto` (knn router) over the 4 LoRA experts: router latency and its share

with the same prompts, concurrency and max_tokens, and reports tokens/s and
p50/p99 latency, each as a ratio to (a). For the dense path it also reports the
swaps, their latency, the bytes each rewrites, and that against this machine's
memory copy bandwidth (torch copy of a buffer the size of the touched bytes).

    .venv/bin/python bench/serve_bench.py --zoo .cache/zoo/demo --out results/serve_bench/cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from servers import start_server, stop_server  # noqa: E402


def seed_store(zoo: Path, store: Path, tasks: list[str]) -> None:
    from experts.store import Compression, ExpertStore
    from experts.zoo.build import ZooLayout

    layout = ZooLayout(zoo)
    s = ExpertStore(store, layout.base)
    from experts.zoo.tasks import get_task

    for task in tasks:
        name = task.replace("_", "-")
        if f"{name}-lora" not in s.names():
            exemplars = [e.question for e in get_task(task).examples("calib", 50, seed=1)]
            s.import_source(f"{name}-lora", layout.lora(task), exemplars=exemplars)
        if name not in s.names():
            s.import_source(name, layout.full(task), compression=Compression(method="magnitude", density=0.05))


def scrape(url: str) -> dict[str, float]:
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


async def drive(url: str, models: list[str], prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    import httpx

    latencies, route_latencies, tokens = [], [], 0
    queue: asyncio.Queue = asyncio.Queue()
    for i, model in enumerate(models):
        queue.put_nowait((model, prompts[i % len(prompts)]))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            model, prompt = queue.get_nowait()
            start = time.perf_counter()
            r = await client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            latencies.append(time.perf_counter() - start)
            body = r.json()
            tokens += body["usage"]["completion_tokens"]
            if body["deltaserve"]["route"] and body["deltaserve"]["route"].get("latency_s") is not None:
                route_latencies.append(body["deltaserve"]["route"]["latency_s"])

    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [latencies[0]] * 99
    out = {"requests": len(latencies), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
           "p50_s": statistics.median(latencies), "p99_s": q[98]}
    if len(route_latencies) >= 2:
        rq = statistics.quantiles(route_latencies, n=100)
        out.update(router_p50_ms=1000 * statistics.median(route_latencies), router_p99_ms=1000 * rq[98],
                   router_share_p50=statistics.median(route_latencies) / out["p50_s"])
    return out


def copy_bandwidth(nbytes: int) -> float:
    import torch

    src = torch.randn(max(1, nbytes // 4))
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=REPO / ".cache/zoo/demo")
    ap.add_argument("--store", type=Path, help="store to use/fill (default: a temporary one)")
    ap.add_argument("--requests", type=int, default=64, help="requests per traffic mix")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=200.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    from experts.zoo.build import ZooLayout
    from experts.zoo.spec import ZooSpec
    from experts.zoo.tasks import get_task

    spec = ZooSpec.model_validate_json((args.zoo / "spec.json").read_text())
    tasks = list(spec.tasks)[:4]
    tmp = tempfile.TemporaryDirectory(prefix="deltaserve-bench-")
    store = args.store or Path(tmp.name) / "store"
    seed_store(args.zoo, store, tasks)
    prompts = [e.question for t in tasks for e in get_task(t).examples("test", 16, seed=args.seed)]
    random.Random(args.seed).shuffle(prompts)
    rng = random.Random(args.seed)
    names = [t.replace("_", "-") for t in tasks]
    n = args.requests
    dense_recipes = [names[0], f"0.5*{names[0]}+0.5*{names[1]}", names[2], f"0.3*{names[1]}+0.7*{names[3]}"]
    mixes = {
        "a: base only": ["base"] * n,
        "b1: one expert, dense path": [names[0]] * n,
        "b2: one expert, LoRA path": [f"{names[0]}-lora"] * n,
        "c: 4 experts mixed, LoRA path": [rng.choice([f"{x}-lora" for x in names]) for _ in range(n)],
        "d: 4 recipes mixed, dense path": [rng.choice(dense_recipes) for _ in range(n)],
        "e: auto (knn) over the 4 LoRA experts": ["auto"] * n,
    }
    proc, url = start_server(ZooLayout(args.zoo).base, store, Path(tmp.name) / "server.log",
                             ["--max-wait-ms", str(args.max_wait_ms), "--router", "knn"])
    rows = []
    try:
        # Warm-up: build every adapter and touch every dense recipe once, so each mix measures steady state.
        asyncio.run(drive(url, [m for mix in mixes.values() for m in sorted(set(mix))], prompts, 1, 4))
        for label, models in mixes.items():
            before = scrape(url)
            result = asyncio.run(drive(url, models, prompts, args.concurrency, args.max_tokens))
            after = scrape(url)
            swaps = after["deltaserve_weight_swaps_total"] - before["deltaserve_weight_swaps_total"]
            swap_s = after["deltaserve_weight_swap_seconds_sum"] - before["deltaserve_weight_swap_seconds_sum"]
            swap_b = after["deltaserve_weight_swap_bytes_total"] - before["deltaserve_weight_swap_bytes_total"]
            rows.append({"mix": label, **result, "swaps": int(swaps),
                         "swap_ms_mean": 1000 * swap_s / swaps if swaps else None,
                         "swap_mib_mean": swap_b / swaps / 2**20 if swaps else None})
            print(f"{label}: {result['tokens_per_s']:.1f} tok/s, p50 {result['p50_s']:.3f} s, "
                  f"p99 {result['p99_s']:.3f} s, swaps {int(swaps)}", flush=True)
    finally:
        stop_server(proc)
    base = rows[0]
    for r in rows:
        r["throughput_vs_a"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["p50_vs_a"] = r["p50_s"] / base["p50_s"]
        r["p99_vs_a"] = r["p99_s"] / base["p99_s"]
    copy_gbs = copy_bandwidth(256 << 20)   # well beyond the CPU caches: the DRAM bandwidth
    print("\n| traffic | tok/s | ×(a) | p50 s | ×(a) | p99 s | ×(a) | swaps | ms/swap | MiB/swap |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mix']} | {r['tokens_per_s']:.1f} | {r['throughput_vs_a']:.2f} | {r['p50_s']:.3f} | "
              f"{r['p50_vs_a']:.2f} | {r['p99_s']:.3f} | {r['p99_vs_a']:.2f} | {r['swaps']} | "
              f"{r['swap_ms_mean'] or 0:.1f} | {r['swap_mib_mean'] or 0:.2f} |")
    for r in rows:
        if "router_p50_ms" in r:
            print(f"\n{r['mix']}: router p50 {r['router_p50_ms']:.2f} ms, p99 {r['router_p99_ms']:.2f} ms "
                  f"({100 * r['router_share_p50']:.1f} % of the p50 request latency)")
    dense = [r for r in rows if r["swaps"]]
    if dense:
        r = max(dense, key=lambda r: r["swaps"])
        achieved = r["swap_mib_mean"] * 2**20 / (r["swap_ms_mean"] / 1000) / 1e9
        at_copy_ms = 1000 * 2 * r["swap_mib_mean"] * 2**20 / (copy_gbs * 1e9)
        print(f"\nswap: {r['swap_mib_mean']:.2f} MiB rewritten in {r['swap_ms_mean']:.1f} ms = {achieved:.2f} GB/s; "
              f"memory copy on this machine {copy_gbs:.2f} GB/s (read+write), at which those bytes would take "
              f"{at_copy_ms:.2f} ms: the swap is {r['swap_ms_mean'] / at_copy_ms:.0f}x that (fixed costs: drain, RPC, "
              "reload_weights, prefix-cache reset)")
        swap_summary = {"mib": r["swap_mib_mean"], "ms": r["swap_ms_mean"], "gb_per_s": achieved,
                        "ms_at_copy_speed": at_copy_ms}
    else:
        swap_summary = None
    if args.out:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=REPO).stdout.strip()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "command": " ".join(["python", *sys.argv]), "commit": commit, "zoo": str(args.zoo),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "requests": n, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
            "max_wait_ms": args.max_wait_ms, "copy_gb_per_s": copy_gbs, "swap": swap_summary, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
