"""Serving benchmark: one deltaserve build, four traffic mixes, ratios to base-only traffic.

Starts ONE ``deltaserve serve`` — on the real suite (SmolLM2-135M-Instruct and the
demo's store: LoRA experts exact, full fine-tunes compressed) by default, or on a
toy zoo with ``--suite toy`` (LoRA experts exact, full fine-tunes magnitude 5 %) —
then drives, in turn:

  a  base only
  b1 one expert on the dense path (sparse)       b2 one expert on the LoRA path
  c  mixed traffic over 4 LoRA experts (a random expert per request)
  d  mixed traffic over 4 dense recipes (a random recipe per request)
  e  `model: auto` (knn router) over the 4 LoRA experts: router latency and its share

with the same prompts, concurrency and max_tokens, and reports tokens/s and
p50/p99 latency, each as a ratio to (a). For the dense path it also reports the
swaps, their latency, the bytes each rewrites, and that against this machine's
memory copy bandwidth (torch copy of a buffer the size of the touched bytes).

    .venv/bin/python -m bench.serving.traffic --out results/serve_bench/real_cpu.json
    .venv/bin/python -m bench.serving.traffic --suite toy --zoo .cache/zoo/demo --out results/serve_bench/cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
from pathlib import Path

from bench.common import REPO, copy_bandwidth, expert_name, lora_name, p99, post_chats, provenance, scrape, \
    seed_store, zoo_spec
from bench.servers import start_server, stop_server


def calib_questions(task: str) -> list[str]:
    """Exemplars of a task's LoRA expert: 50 calib questions (seed 1)."""
    from zoo.tasks import get_task

    return [e.question for e in get_task(task).examples("calib", 50, seed=1)]


async def drive(url: str, models: list[str], prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """Request ``models[i]`` on ``prompts[i % len]``, ``concurrency`` in flight: tokens/s, p50/p99 latency
    (and the router's latency when the requests were routed)."""
    jobs = [(None, {"model": model, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
            for i, model in enumerate(models)]
    done, wall = await post_chats(url, jobs, concurrency)
    latencies = [latency for _, _, latency in done]
    tokens = sum(body["usage"]["completion_tokens"] for _, body, _ in done)
    route_latencies = [body["deltaserve"]["route"]["latency_s"] for _, body, _ in done
                       if body["deltaserve"]["route"] and body["deltaserve"]["route"].get("latency_s") is not None]
    out = {"requests": len(latencies), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
           "p50_s": statistics.median(latencies), "p99_s": p99(latencies)}
    if len(route_latencies) >= 2:
        out.update(router_p50_ms=1000 * statistics.median(route_latencies), router_p99_ms=1000 * p99(route_latencies),
                   router_share_p50=statistics.median(route_latencies) / out["p50_s"])
    return out


def traffic_mixes(names: list[str], loras: list[str], n: int, seed: int) -> dict[str, list[str]]:
    """The model of each request, per traffic mix (a .. e of the docstring)."""
    rng = random.Random(seed)
    dense_recipes = [names[0], f"0.5*{names[0]}+0.5*{names[1]}", names[2], f"0.3*{names[1]}+0.7*{names[3]}"]
    return {
        "a: base only": ["base"] * n,
        "b1: one expert, dense path": [names[0]] * n,
        "b2: one expert, LoRA path": [loras[0]] * n,
        "c: 4 experts mixed, LoRA path": [rng.choice(loras) for _ in range(n)],
        "d: 4 recipes mixed, dense path": [rng.choice(dense_recipes) for _ in range(n)],
        "e: auto (knn) over the 4 LoRA experts": ["auto"] * n,
    }


def run_mixes(url: str, mixes: dict[str, list[str]], prompts: list[str], args: argparse.Namespace) -> list[dict]:
    """One row per mix: its traffic result, the swaps it caused, and ratios to mix (a)."""
    # Warm-up: build every adapter and touch every dense recipe once, so each mix measures steady state.
    asyncio.run(drive(url, [m for mix in mixes.values() for m in sorted(set(mix))], prompts, 1, 4))
    rows = []
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
    base = rows[0]
    for r in rows:
        r["throughput_vs_a"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["p50_vs_a"] = r["p50_s"] / base["p50_s"]
        r["p99_vs_a"] = r["p99_s"] / base["p99_s"]
    return rows


def print_table(rows: list[dict]) -> None:
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


def swap_summary(rows: list[dict], copy_gbs: float) -> dict | None:
    """The busiest dense-path mix's swap: bytes, time, GB/s, and the time at copy speed (printed too)."""
    dense = [r for r in rows if r["swaps"]]
    if not dense:
        return None
    r = max(dense, key=lambda r: r["swaps"])
    achieved = r["swap_mib_mean"] * 2**20 / (r["swap_ms_mean"] / 1000) / 1e9
    at_copy_ms = 1000 * 2 * r["swap_mib_mean"] * 2**20 / (copy_gbs * 1e9)
    print(f"\nswap: {r['swap_mib_mean']:.2f} MiB rewritten in {r['swap_ms_mean']:.1f} ms = {achieved:.2f} GB/s; "
          f"memory copy on this machine {copy_gbs:.2f} GB/s (read+write), at which those bytes would take "
          f"{at_copy_ms:.2f} ms: the swap is {r['swap_ms_mean'] / at_copy_ms:.0f}x that (fixed costs: drain, RPC, "
          "reload_weights, prefix-cache reset)")
    return {"mib": r["swap_mib_mean"], "ms": r["swap_ms_mean"], "gb_per_s": achieved, "ms_at_copy_speed": at_copy_ms}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["real", "toy"], default="real",
                    help="real: SmolLM2-135M-Instruct and the demo's store; toy: a toy zoo (--zoo)")
    ap.add_argument("--zoo", type=Path, default=REPO / ".cache/zoo/demo")
    ap.add_argument("--store", type=Path, help="store to use/fill (default: a temporary one)")
    ap.add_argument("--requests", type=int, default=64, help="requests per traffic mix")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=200.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    return ap.parse_args(argv)


def toy_setup(args: argparse.Namespace, store: Path) -> tuple[Path, list[str], list[str], list[str], list[str]]:
    """(base, dense expert names, LoRA names, prompts, server flags) of a toy zoo."""
    from experts.store import Compression
    from zoo.build import ZooLayout
    from zoo.tasks import get_task

    tasks = list(zoo_spec(args.zoo).tasks)[:4]
    seed_store(args.zoo, store, tasks, full={"": Compression(method="magnitude", density=0.05)},
               lora_exemplars=calib_questions)
    prompts = [e.question for t in tasks for e in get_task(t).examples("test", 16, seed=args.seed)]
    return ZooLayout(args.zoo).base, [expert_name(t) for t in tasks], [lora_name(t) for t in tasks], prompts, []


def real_setup(args: argparse.Namespace, store: Path) -> tuple[Path, list[str], list[str], list[str], list[str]]:
    """The same for the real suite: the demo's store (LoRAs exact, full fine-tunes compressed)."""
    from server.commands.demo import REAL_ROOT, expert_names, seed_real_store
    from zoo.real.build import RealSuiteBuilder
    from zoo.real.skills import get_skill

    builder = RealSuiteBuilder(REPO / REAL_ROOT)
    builder.build(workers=2)
    skills = list(builder.spec.skills)[:4]
    base = seed_real_store(builder, store)
    prompts = [e.question for s in skills for e in get_skill(s).examples("test", 16, seed=args.seed)]
    return (base, [expert_names(s)[1] for s in skills], [expert_names(s)[0] for s in skills], prompts,
            ["--max-model-len", "512"])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record = provenance(argv=argv)  # at the start: HEAD may move during the run
    tmp = tempfile.TemporaryDirectory(prefix="deltaserve-bench-")
    store = args.store or Path(tmp.name) / "store"
    base, names, loras, prompts, flags = (real_setup if args.suite == "real" else toy_setup)(args, store)
    random.Random(args.seed).shuffle(prompts)
    mixes = traffic_mixes(names, loras, args.requests, args.seed)
    proc, url = start_server(base, store, Path(tmp.name) / "server.log",
                             ["--max-wait-ms", str(args.max_wait_ms), "--router", "knn", *flags])
    try:
        rows = run_mixes(url, mixes, prompts, args)
    finally:
        stop_server(proc)
    copy_gbs = copy_bandwidth(256 << 20)   # well beyond the CPU caches: the DRAM bandwidth
    print_table(rows)
    swap = swap_summary(rows, copy_gbs)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            **record, "suite": args.suite, "base": str(base), "requests": args.requests,
            "concurrency": args.concurrency, "max_tokens": args.max_tokens, "max_wait_ms": args.max_wait_ms,
            "copy_gb_per_s": copy_gbs, "swap": swap, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
