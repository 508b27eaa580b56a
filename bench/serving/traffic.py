"""Serving benchmark: one deltaserve build, four traffic mixes, ratios to base-only traffic.

Starts ONE ``deltaserve serve`` — on the real suite (SmolLM2-135M-Instruct and the
demo's store: LoRA experts exact, full fine-tunes compressed) by default, or on a
toy zoo with ``--suite toy`` (LoRA experts exact, full fine-tunes magnitude 5 %) —
then drives, in turn:

  a  base only
  b1 one expert on the dense path (sparse)       b2 one expert on the LoRA path
  c  mixed traffic over 4 LoRA experts (a random expert per request)
  d  mixed traffic over 4 dense recipes (a random recipe per request)
  e  `model: auto` (knn router), prompts of the 4 skills uniformly mixed: router latency and its share
  f  `model: auto`, a realistic mix: 70 % of the prompts from one skill, 30 % from the other three

and with ``--lora-off`` a third server without vLLM's LoRA kernels (``--lora off``) for a, b1, b2 (the LoRA
expert then served from merged weights) and d, also as ratios to the LoRA-enabled server's (a)

with the same prompts, concurrency and max_tokens, and reports tokens/s and
p50/p99 latency, each as a ratio to (a). For the dense path it also reports the
swaps, their latency, the bytes each rewrites, and that against this machine's
memory copy bandwidth (torch copy of a buffer the size of the touched bytes),
with the swap's breakdown (drain, RPC, decode, merge, load, retie, prefix-cache
reset, resume; ``deltaserve_weight_swap_phase_seconds``). The server runs with
its defaults (adaptive merge on: a dominant LoRA recipe is served merged).

    .venv/bin/python -m bench.serving.traffic --out results/serving/real_cpu.json
    .venv/bin/python -m bench.serving.traffic --suite synthetic --adaptive both    # random experts, any machine
    .venv/bin/python -m bench.serving.traffic --suite toy --zoo .cache/zoo/demo --out results/serving/cpu.json
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
    from deltaserve_zoo.tasks import get_task

    return [e.question for e in get_task(task).examples("calib", 50, seed=1)]


async def drive(url: str, requests: list[tuple[str, str]], concurrency: int, max_tokens: int) -> dict:
    """Send each (model, prompt), ``concurrency`` in flight: tokens/s, p50/p99 latency, the paths that served
    them (and the router's latency when the requests were routed)."""
    jobs = [(None, {"model": model, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
            for model, prompt in requests]
    done, wall = await post_chats(url, jobs, concurrency)
    latencies = [latency for _, _, latency in done]
    tokens = sum(body["usage"]["completion_tokens"] for _, body, _ in done)
    route_latencies = [body["deltaserve"]["route"]["latency_s"] for _, body, _ in done
                       if body["deltaserve"]["route"] and body["deltaserve"]["route"].get("latency_s") is not None]
    paths = [body["deltaserve"]["path"] for _, body, _ in done]
    out = {"requests": len(latencies), "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
           "p50_s": statistics.median(latencies), "p99_s": p99(latencies),
           "paths": {p: paths.count(p) for p in sorted(set(paths))}}
    if len(route_latencies) >= 2:
        out.update(router_p50_ms=1000 * statistics.median(route_latencies), router_p99_ms=1000 * p99(route_latencies),
                   router_share_p50=statistics.median(route_latencies) / out["p50_s"])
    return out


def traffic_mixes(names: list[str], loras: list[str], prompts: list[list[str]], n: int, seed: int
                  ) -> dict[str, list[tuple[str, str]]]:
    """(model, prompt) of each request, per traffic mix (a .. f of the docstring); ``prompts`` per skill."""
    rng = random.Random(seed)
    dense_recipes = [names[0], f"0.5*{names[0]}+0.5*{names[1]}", names[2], f"0.3*{names[1]}+0.7*{names[3]}"]
    mixed = [rng.choice(rng.choice(prompts)) for _ in range(n)]
    realistic = [rng.choice(prompts[0] if rng.random() < 0.7 else rng.choice(prompts[1:])) for _ in range(n)]
    return {
        "a: base only": [("base", p) for p in mixed],
        "b1: one expert, dense path": [(names[0], p) for p in mixed],
        "b2: one expert, LoRA path": [(loras[0], p) for p in mixed],
        "c: 4 experts mixed, LoRA path": [(rng.choice(loras), p) for p in mixed],
        "d: 4 recipes mixed, dense path": [(rng.choice(dense_recipes), p) for p in mixed],
        "e: auto (knn), uniform mix of 4 skills": [("auto", p) for p in mixed],
        "f: auto (knn), 70 % one skill": [("auto", p) for p in realistic],
    }


def run_mixes(url: str, mixes: dict[str, list[tuple[str, str]]], args: argparse.Namespace) -> list[dict]:
    """One row per mix: its traffic result, the swaps it caused (with their phases), and ratios to mix (a)."""
    # Warm-up: build every adapter and touch every dense recipe once, so each mix measures steady state.
    warm = sorted({(m, mix[0][1]) for mix in mixes.values() for m, _ in mix})
    asyncio.run(drive(url, warm, 1, 4))
    rows = []
    for label, requests in mixes.items():
        warm = scrape(url)
        if args.warmup:
            asyncio.run(drive(url, requests[-args.warmup:], args.concurrency, args.max_tokens))
        before = scrape(url)
        result = asyncio.run(drive(url, requests, args.concurrency, args.max_tokens))
        after = scrape(url)

        def delta(name: str, after: dict = after, before: dict = before) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)
        swaps = delta("deltaserve_weight_swaps_total")
        phases = {k.split('phase="')[1].rstrip('"}'): 1000 * delta(k) / swaps
                  for k in after if k.startswith("deltaserve_weight_swap_phase_seconds_total{")} if swaps else {}
        rows.append({"mix": label, **result, "swaps": int(swaps), "warmup": args.warmup,
                     "warmup_swaps": int(before["deltaserve_weight_swaps_total"]
                                         - warm["deltaserve_weight_swaps_total"]),
                     "swap_ms_mean": 1000 * delta("deltaserve_weight_swap_seconds_sum") / swaps if swaps else None,
                     "swap_mib_mean": delta("deltaserve_weight_swap_bytes_total") / swaps / 2**20 if swaps else None,
                     "swap_phase_ms_mean": phases,
                     "adaptive_switches": delta('deltaserve_adaptive_switches_total{to="merged"}')
                     + delta('deltaserve_adaptive_switches_total{to="lora"}')})
        print(f"{label}: {result['tokens_per_s']:.1f} tok/s, p50 {result['p50_s']:.3f} s, "
              f"p99 {result['p99_s']:.3f} s, swaps {int(swaps)}", flush=True)
    base = rows[0]
    for r in rows:
        r["throughput_vs_a"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["p50_vs_a"] = r["p50_s"] / base["p50_s"]
        r["p99_vs_a"] = r["p99_s"] / base["p99_s"]
    return rows


def print_table(rows: list[dict]) -> None:
    print("\n| traffic | adaptive | LoRA | tok/s | ×(a) | ×(a, LoRA on) | p50 s | ×(a) | p99 s | ×(a) | swaps | "
          "ms/swap | MiB/swap | served on |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        paths = ", ".join(f"{k} {v}" for k, v in r["paths"].items())
        print(f"| {r['mix']} | {r['adaptive']} | {r.get('lora', 'on')} | {r['tokens_per_s']:.1f} | "
              f"{r['throughput_vs_a']:.2f} | {r.get('throughput_vs_lora_engine_a', 1.0):.2f} | {r['p50_s']:.3f} | "
              f"{r['p50_vs_a']:.2f} | {r['p99_s']:.3f} | {r['p99_vs_a']:.2f} | {r['swaps']} | "
              f"{r['swap_ms_mean'] or 0:.1f} | {r['swap_mib_mean'] or 0:.2f} | {paths} |")
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
          f"{at_copy_ms:.2f} ms: the swap is {r['swap_ms_mean'] / at_copy_ms:.0f}x that")
    print("breakdown (ms per swap): " + ", ".join(f"{k} {v:.1f}" for k, v in r["swap_phase_ms_mean"].items()))
    return {"mix": r["mix"], "mib": r["swap_mib_mean"], "ms": r["swap_ms_mean"], "gb_per_s": achieved,
            "ms_at_copy_speed": at_copy_ms, "phases_ms": r["swap_phase_ms_mean"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["real", "toy", "synthetic"], default="real",
                    help="real: SmolLM2-135M-Instruct and the demo's store; toy: a toy zoo (--zoo); synthetic: the "
                         "real base with random LoRAs and random sparse experts (no training: speed only)")
    ap.add_argument("--adaptive", choices=["on", "off", "both"], default="on",
                    help="the server's --adaptive-merge; both: one server each, off first")
    ap.add_argument("--url", help="drive this running server instead of starting one (its store must hold the suite's "
                                  "experts, e.g. --suite synthetic's; its own flags stand, rows say adaptive "
                                  "'server')")
    ap.add_argument("--lora-off", action="store_true",
                    help="also run mixes a, b1, b2 and d on a server with --lora off (no LoRA kernels in vLLM: "
                         "LoRA recipes from merged weights), each also as a ratio to the LoRA-enabled server's (a)")
    ap.add_argument("--device", default="cpu", help="for the copy-bandwidth floor (cuda on a GPU machine)")
    ap.add_argument("--zoo", type=Path, default=REPO / ".cache/zoo/demo")
    ap.add_argument("--store", type=Path, help="store to use/fill (default: a temporary one)")
    ap.add_argument("--requests", type=int, default=64, help="requests per traffic mix")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=32,
                    help="requests of each mix sent (at its concurrency) before it is measured: the numbers are "
                         "the mix's steady state (32: the adaptive policy's history, four windows of 8 requests); "
                         "the swaps of switching into it are reported as warmup_swaps")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=200.0)
    ap.add_argument("--tensor-parallel-size", type=int, default=1, help="the server's ranks (vLLM tensor parallel)")
    ap.add_argument("--base", type=Path, help="--suite synthetic on this base instead of the real one (e.g. a "
                                              "zoo.families checkpoint whose heads split over the ranks)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    return ap.parse_args(argv)


def toy_setup(args: argparse.Namespace, store: Path) -> tuple[Path, list[str], list[str], list[list[str]], list[str]]:
    """(base, dense expert names, LoRA names, prompts per task, server flags) of a toy zoo."""
    from deltaserve.experts.sources import Compression
    from deltaserve_zoo.build import ZooLayout
    from deltaserve_zoo.tasks import get_task

    tasks = list(zoo_spec(args.zoo).tasks)[:4]
    seed_store(args.zoo, store, tasks, full={"": Compression(method="magnitude", density=0.05)},
               lora_exemplars=calib_questions)
    prompts = [[e.question for e in get_task(t).examples("test", 16, seed=args.seed)] for t in tasks]
    return ZooLayout(args.zoo).base, [expert_name(t) for t in tasks], [lora_name(t) for t in tasks], prompts, []


def real_setup(args: argparse.Namespace, store: Path) -> tuple[Path, list[str], list[str], list[list[str]], list[str]]:
    """The same for the real suite: the demo's store (LoRAs exact, full fine-tunes compressed)."""
    from deltaserve_zoo.real.build import DEFAULT_ROOT, RealSuiteBuilder
    from deltaserve_zoo.real.live import expert_names, publish_all
    from deltaserve_zoo.real.skills import get_skill

    builder = RealSuiteBuilder(REPO / DEFAULT_ROOT)
    builder.build(workers=2)
    skills = list(builder.spec.skills)[:4]
    base = publish_all(builder, store)
    prompts = [[e.question for e in get_skill(s).examples("test", 16, seed=args.seed)] for s in skills]
    return (base, [expert_names(s)[1] for s in skills], [expert_names(s)[0] for s in skills], prompts,
            ["--max-model-len", "512"])


def synthetic_setup(args: argparse.Namespace, store: Path) -> tuple[Path, list[str], list[str], list[list[str]],
                                                                   list[str]]:
    """The real base with 4 random LoRAs (exemplars: 4 skills' calib questions, for `auto`) and 4 random
    sparse experts (zoo.real.synthetic.publish_synthetic): serving speed does not depend on what an expert
    learned, so no training is needed."""
    from deltaserve_zoo.real.build import RealSuiteBuilder
    from deltaserve_zoo.real.synthetic import publish_synthetic

    if args.base is not None:
        base = args.base
    else:
        builder = RealSuiteBuilder(REPO / ".cache" / "zoo" / "real")
        builder.build_base()
        base = builder.layout.base
    names, loras = publish_synthetic(base, store, store.parent / "synthetic")
    return base, names, loras, synthetic_prompts(args.seed), ["--max-model-len", "512"]


def synthetic_prompts(seed: int) -> list[list[str]]:
    """Test questions of the 4 skills whose calib questions the synthetic LoRAs have as exemplars."""
    from deltaserve_zoo.real.skills import get_skill
    from deltaserve_zoo.real.synthetic import SYNTHETIC_SKILLS

    return [[e.question for e in get_skill(s).examples("test", 16, seed=seed)] for s in SYNTHETIC_SKILLS]


SETUPS = {"real": real_setup, "toy": toy_setup, "synthetic": synthetic_setup}


LORA_OFF_MIXES = ("a: base only", "b1: one expert, dense path", "b2: one expert, LoRA path",
                  "d: 4 recipes mixed, dense path")


def serve_mixes(base: Path, store: Path, log: Path, flags: list[str], mixes: dict, args: argparse.Namespace,
                adaptive: str, lora: str = "on") -> list[dict]:
    """Start one server (``--adaptive-merge adaptive --lora lora``), drive every mix, stop it; rows with ratios
    to its (a)."""
    proc, url = start_server(base, store, log, ["--max-wait-ms", str(args.max_wait_ms), "--router", "knn",
                                                "--adaptive-merge", adaptive, "--lora", lora,
                                                "--tensor-parallel-size", str(args.tensor_parallel_size), *flags])
    try:
        swaps = health(url)["dense_swaps"]
        rows = run_mixes(url, mixes, args)
    finally:
        stop_server(proc)
    return [{**r, "adaptive": adaptive, "lora": lora, "tp": args.tensor_parallel_size, "swap_mode": swaps}
            for r in rows]


def health(url: str) -> dict:
    import httpx

    return httpx.get(url + "/health", timeout=30).json()


def run_against(args: argparse.Namespace, record: dict) -> dict:
    """The mixes against the running server at ``args.url`` (``--suite synthetic``'s experts in its store)."""
    from deltaserve_zoo.real.synthetic import synthetic_names

    if args.suite != "synthetic":
        raise SystemExit("--url drives --suite synthetic's experts (lora-0..3, sparse-0..3) on a running server")
    names, loras = synthetic_names()
    rows = [{**r, "adaptive": "server", "lora": "on", "swap_mode": health(args.url)["dense_swaps"]}
            for r in run_mixes(args.url, traffic_mixes(names, loras, synthetic_prompts(args.seed), args.requests,
                                                        args.seed), args)]
    return summary(rows, args, record, args.url)


def summary(rows: list[dict], args: argparse.Namespace, record: dict, base: object) -> dict:
    reference = rows[0]["tokens_per_s"]   # base-only traffic on the first (LoRA-enabled) server
    for r in rows:
        r["throughput_vs_lora_engine_a"] = r["tokens_per_s"] / reference
    copy_gbs = copy_bandwidth(256 << 20, device=args.device)   # well beyond the caches: the DRAM/HBM bandwidth
    print_table(rows)
    swap = swap_summary(rows, copy_gbs)
    return {**record, "suite": args.suite, "base": str(base), "requests": args.requests,
            "concurrency": args.concurrency, "max_tokens": args.max_tokens, "max_wait_ms": args.max_wait_ms,
            "device": args.device, "copy_gb_per_s": copy_gbs, "swap": swap, "rows": rows}


def run(args: argparse.Namespace, record: dict) -> dict:
    if args.url:
        return run_against(args, record)
    tmp = tempfile.TemporaryDirectory(prefix="deltaserve-bench-")
    store = args.store or Path(tmp.name) / "store"
    base, names, loras, prompts, flags = SETUPS[args.suite](args, store)
    mixes = traffic_mixes(names, loras, prompts, args.requests, args.seed)
    rows = []
    for adaptive in (["off", "on"] if args.adaptive == "both" else [args.adaptive]):
        rows += serve_mixes(base, store, Path(tmp.name) / f"server-{adaptive}.log", flags, mixes, args, adaptive)
    if args.lora_off:
        subset = {k: v for k, v in mixes.items() if k in LORA_OFF_MIXES}
        rows += serve_mixes(base, store, Path(tmp.name) / "server-nolora.log", flags, subset, args, "on", "off")
    return summary(rows, args, record, base)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args, provenance(argv=argv))  # provenance first: HEAD may move during the run
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
