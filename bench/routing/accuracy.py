"""Routing accuracy and router latency on this CPU.

1. accuracy of knn and gate on held-out zoo test prompts (new payloads; phrasing 5,
   or 4 and 5, never seen by the router), for the 6 zoo tasks and all 14 tasks;
   confusion matrices;
2. accuracy of the uncertainty router with hf_nll_scorer on the zoo's LoRA experts
   (prompt NLL, as vLLM prompt_logprobs gives, and the NLL of each expert's own
   greedy answer);
3. latency of routing one prompt (p50/p99): encoder (fresh / cached text), the
   router's scoring, the policy, end to end;
4. scaling of knn/gate with 10/100/1000 experts (synthetic exemplar features, real
   encoder for the query).

    .venv/bin/python -m bench.routing.accuracy --out results/routing
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # a shared 2-core machine: one thread everywhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from bench.common import REPO, provenance  # noqa: E402
from deltaserve.router import Policy, RoutingService, make_router  # noqa: E402
from deltaserve.router.features import SentenceEncoder  # noqa: E402
from deltaserve.router.uncertainty import hf_nll_scorer  # noqa: E402
from deltaserve_zoo.build import ZooLayout  # noqa: E402
from deltaserve_zoo.exemplars import ZOO_TASKS, LabelledPrompt, zoo_exemplars, zoo_prompts  # noqa: E402
from deltaserve_zoo.tasks import TASKS  # noqa: E402

NO_FALLBACK = Policy(min_confidence=0.0, max_distance=None)


def evaluate(service: RoutingService, prompts: list[LabelledPrompt], held_out: tuple[int, ...]) -> dict:
    """Accuracy (top-1 recipe == task) with the service's policy and with no fallback."""
    texts = [p.text for p in prompts]
    decisions = service.route(texts)
    scored = service.router.score(texts)
    top = [max(s, key=s.get) if s else None for s, _ in scored]
    unseen = np.array([p.phrasing in held_out for p in prompts])
    routed = np.array([d.recipe == {p.task: 1.0} for d, p in zip(decisions, prompts)])
    argmax = np.array([t == p.task for t, p in zip(top, prompts)])
    tasks = sorted({p.task for p in prompts})
    confusion = {t: {u: 0 for u in tasks} for t in tasks}
    for t, p in zip(top, prompts):
        confusion[p.task][t] += 1
    return {
        "n": len(prompts), "n_unseen": int(unseen.sum()),
        "accuracy": round(float(routed.mean()), 4), "accuracy_unseen": round(float(routed[unseen].mean()), 4),
        "accuracy_seen": round(float(routed[~unseen].mean()), 4),
        "argmax_accuracy": round(float(argmax.mean()), 4),
        "argmax_accuracy_unseen": round(float(argmax[unseen].mean()), 4),
        "fallback_rate": round(float(np.mean([d.fallback is not None for d in decisions])), 4),
        "confusion": confusion,
    }


def exemplar_accuracy(encoder: SentenceEncoder, n_exemplars: int, n_test: int,
                      sets: tuple[str, ...] = ("zoo", "all")) -> list[dict]:
    rows = []
    task_sets = {"zoo": ZOO_TASKS, "all": tuple(TASKS)}
    for task_set, tasks in ((s, task_sets[s]) for s in sets):
        for held_out in ((5,), (4, 5)):
            seen = [p for p in range(6) if p not in held_out]
            exemplars = zoo_exemplars(tasks, n_exemplars, seen)
            prompts = zoo_prompts(tasks, n_test)
            for name in ("knn", "gate"):
                router = make_router(name, encoder=encoder)
                started = time.perf_counter()
                router.fit(exemplars)
                fit_s = time.perf_counter() - started
                row = {"router": name, "encoder": encoder.precision, "tasks": task_set,
                       "held_out_phrasings": list(held_out),
                       "fit_s": round(fit_s, 3), **evaluate(RoutingService(router), prompts, held_out)}
                rows.append(row)
                print(f"{name:5s} {encoder.precision} {task_set:4s} held out {held_out}: acc {row['accuracy']:.3f} "
                      f"unseen {row['accuracy_unseen']:.3f} argmax {row['argmax_accuracy']:.3f} "
                      f"fallback {row['fallback_rate']:.3f}", flush=True)
    return rows


def uncertainty_accuracy(zoo: Path, n_test: int) -> list[dict]:
    layout = ZooLayout(zoo)
    adapters = {t: layout.lora(t) for t in ZOO_TASKS}
    prompts = zoo_prompts(ZOO_TASKS, n_test)
    rows = []
    for target in ("prompt", "answer"):
        scorer = hf_nll_scorer(layout.base, adapters, target=target)
        router = make_router("uncertainty", uncertainty_scorer=scorer)
        router.fit({t: [] for t in ZOO_TASKS})
        started = time.perf_counter()
        shown = zoo.relative_to(REPO) if zoo.is_relative_to(REPO) else zoo
        row = {"router": "uncertainty", "target": target, "zoo": str(shown),
               **evaluate(RoutingService(router), prompts, (5,))}
        row["score_s_per_prompt"] = round((time.perf_counter() - started) / (2 * len(prompts)), 5)
        times = _timed(lambda i, router=router: router.score([prompts[i % len(prompts)].text + f" {i}"]), 20)
        row["one_prompt_ms"] = _percentiles(times)
        rows.append(row)
        print(f"uncertainty/{target}: argmax acc {row['argmax_accuracy']:.3f}, fallback {row['fallback_rate']:.3f}, "
              f"one prompt p50 {row['one_prompt_ms']['p50']:.1f} ms", flush=True)
    return rows


def _timed(call, n: int) -> list[float]:
    call(-1)  # warm up
    out = []
    for i in range(n):
        started = time.perf_counter()
        call(i)
        out.append(time.perf_counter() - started)
    return out


def _percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"p50": round(float(np.percentile(ms, 50)), 3), "p99": round(float(np.percentile(ms, 99)), 3),
            "n": len(ms)}


class SyntheticExemplars:
    """Exemplar texts ``e<i>/<j>`` get clustered random unit vectors; any other text
    goes to ``self.query`` (a real encoder, switchable). Scales the index without
    encoding 20k texts."""

    def __init__(self, query: SentenceEncoder, seed: int = 0):
        self.query, self.dim, self.seed = query, query.dim, seed

    def encode(self, texts):
        out = np.empty((len(texts), self.dim), np.float32)
        real = [i for i, t in enumerate(texts) if not (t.startswith("e") and "/" in t)]
        if real:
            out[real] = self.query.encode([texts[i] for i in real])
        for i in sorted(set(range(len(texts))) - set(real)):
            expert, j = texts[i][1:].split("/")
            center = np.random.default_rng([self.seed, int(expert)]).standard_normal(self.dim)
            noise = np.random.default_rng([self.seed, int(expert), int(j)]).standard_normal(self.dim)
            vector = center / np.linalg.norm(center) + 0.5 * noise / np.linalg.norm(noise)
            out[i] = vector / np.linalg.norm(vector)
        return out


def _interleaved(calls: dict[str, callable], n: int) -> dict[str, dict]:
    """Time each call n times, round-robin, so machine load hits all of them alike."""
    for call in calls.values():
        call(-1)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(n):
        for name, call in calls.items():
            started = time.perf_counter()
            call(i)
            times[name].append(time.perf_counter() - started)
    return {name: _percentiles(t) for name, t in times.items()}


def latency(encoders: dict[str, SentenceEncoder], n_prompts: int, scales: tuple[int, ...],
            per_expert: int) -> list[dict]:
    """p50/p99 for one prompt; a fresh text each call (no cache hit) unless "cached"."""
    prompts = [p.text for p in zoo_prompts(ZOO_TASKS, n_prompts // len(ZOO_TASKS) + 1, split="calib", seed=7)]

    def fresh(i: int, tag: str) -> str:
        return f"{prompts[i % len(prompts)]} #{i} {tag}"

    def encode_with(enc: SentenceEncoder, tag: str):
        return lambda i: enc.encode([fresh(i, tag)])

    stats = _interleaved({p: encode_with(e, f"enc-{p}") for p, e in encoders.items()}, n_prompts)
    rows = [{"stage": "encoder", "precision": p, "experts": 0, "ms": ms} for p, ms in stats.items()]
    fp32 = encoders["fp32"]
    fp32.encode(prompts[:1])
    rows.append({"stage": "encoder", "precision": "cached", "experts": 0,
                 "ms": _interleaved({"c": lambda i: fp32.encode(prompts[:1])}, n_prompts)["c"]})
    synthetic = SyntheticExemplars(fp32)

    def route_with(service: RoutingService, precision: str, tag: str):
        def call(i: int) -> None:
            synthetic.query = encoders[precision]
            service.route([fresh(i, tag)])
        return call

    for n_experts in scales:
        exemplars = {f"x{i:04d}": [f"e{i}/{j}" for j in range(per_expert)] for i in range(n_experts)}
        for name in ("knn", "gate"):
            router = make_router(name, encoder=synthetic, **({"max_iter": 200} if name == "gate" else {}))
            started = time.perf_counter()
            router.fit(exemplars)
            fit_s = round(time.perf_counter() - started, 3)
            service = RoutingService(router)
            calls = {p: route_with(service, p, f"{name}{n_experts}{p}") for p in encoders}
            calls["cached"] = lambda i, service=service: service.route(prompts[:1])
            stats = _interleaved(calls, n_prompts)
            synthetic.query = fp32
            for precision, ms in stats.items():
                rows.append({"stage": "route", "router": name, "precision": precision, "experts": n_experts,
                             "exemplars": n_experts * per_expert, "fit_s": fit_s, "ms": ms})
            timings = ", ".join(f"{p} p50 {ms['p50']:.2f} p99 {ms['p99']:.2f} ms" for p, ms in stats.items())
            print(f"{name:5s} {n_experts:5d} experts: {timings}; fit {fit_s:.1f} s", flush=True)
    return rows


def markdown(record: dict) -> str:
    lines = ["# Routing accuracy and latency", "", f"- command: `{record['command']}`",
             f"- git: `{record['git_commit']}`", f"- date: {record['date']}", f"- machine: {record['machine']}", "",
             "## knn / gate on held-out zoo test prompts (default calibrated policy)", "",
             "| router | tasks | unseen phrasings | accuracy | seen | unseen | argmax acc | fallback | fit s |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in record["exemplar_routers"] + record["int8_accuracy"]:
        lines.append(f"| {r['router']} ({r['encoder']}) | {r['tasks']} ({len(r['confusion'])}) | "
                     f"{r['held_out_phrasings']} | "
                     f"{r['accuracy']:.1%} | {r['accuracy_seen']:.1%} | {r['accuracy_unseen']:.1%} | "
                     f"{r['argmax_accuracy']:.1%} | {r['fallback_rate']:.1%} | {r['fit_s']} |")
    lines += ["", "## uncertainty (hf_nll_scorer, LoRA experts)", "",
              "| target | zoo | argmax acc | unseen | routed acc | fallback | one prompt p50 / p99 ms |",
              "|---|---|---:|---:|---:|---:|---:|"]
    for r in record["uncertainty"]:
        lines.append(f"| {r['target']} | {r['zoo']} | {r['argmax_accuracy']:.1%} | "
                     f"{r['argmax_accuracy_unseen']:.1%} | "
                     f"{r['accuracy']:.1%} | {r['fallback_rate']:.1%} | {r['one_prompt_ms']['p50']} / "
                     f"{r['one_prompt_ms']['p99']} |")
    lines += ["", "## Latency of one prompt (ms)", "",
              "Encoder precision, or `cached`: the text was encoded before (LRU hit), so the row",
              "is the router + policy alone. Calls interleaved round-robin across columns.", "",
              "| stage | router | encoder | experts | exemplars | p50 | p99 | fit s |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in record["latency"]:
        lines.append(f"| {r['stage']} | {r.get('router', '')} | {r['precision']} | {r['experts']} | "
                     f"{r.get('exemplars', '')} | {r['ms']['p50']} | {r['ms']['p99']} | {r.get('fit_s', '')} |")
    lines += ["", "## Confusion (rows: task, columns: top-1 expert)", ""]
    for r in record["exemplar_routers"][:2] + record["uncertainty"]:
        tasks = list(r["confusion"])
        title = f"{r['router']} {r.get('tasks', '')} {r.get('target', '')}".strip()
        lines += [f"**{title}**", "", "| task | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
        lines += [f"| {t} | " + " | ".join(str(r["confusion"][t][u]) for u in tasks) + " |" for t in tasks]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="routing accuracy and latency")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "routing")
    parser.add_argument("--zoo", type=Path, default=REPO / ".cache" / "zoo" / "demo",
                        help="zoo whose LoRA experts the uncertainty router uses")
    parser.add_argument("--n-exemplars", type=int, default=50)
    parser.add_argument("--n-test", type=int, default=60, help="test prompts per task")
    parser.add_argument("--n-latency", type=int, default=200)
    parser.add_argument("--per-expert", type=int, default=20, help="synthetic exemplars per expert")
    parser.add_argument("--scales", default="10,100,1000")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    record = {**provenance(argv=argv),
              "machine": f"{os.cpu_count()} CPU cores (shared), 1 thread, torch {torch.__version__}"}
    with threadpool_limits(1):
        encoder = SentenceEncoder()
        record["exemplar_routers"] = exemplar_accuracy(encoder, args.n_exemplars, args.n_test)
        record["uncertainty"] = uncertainty_accuracy(args.zoo.resolve(), args.n_test // 2)
        scales = tuple(int(s) for s in args.scales.split(","))
        encoders = {"fp32": encoder, **{p: SentenceEncoder(precision=p) for p in ("bf16", "int8")}}
        record["int8_accuracy"] = exemplar_accuracy(encoders["int8"], args.n_exemplars, args.n_test, sets=("zoo",))
        record["latency"] = latency(encoders, args.n_latency, scales, args.per_expert)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / "accuracy.md").write_text(markdown(record))
    print(f"wrote {args.out / 'accuracy.json'} and accuracy.md")


if __name__ == "__main__":
    main()
