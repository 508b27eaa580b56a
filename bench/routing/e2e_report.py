"""Tables and verdicts of bench.routing.e2e: pure functions of its rows; writes results.json/.md."""

from __future__ import annotations

import json
from pathlib import Path

# Table order: the first prefix a row's label starts with (stable: densities keep their order).
ROW_ORDER = ("individual: LoRA", "individual: full", "base", "static: uniform", "static: ties",
             "auto: knn (exemplars on L", "auto: gate", "auto: uncertainty", "auto: knn (exemplars on d")


def sort_rows(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: next(i for i, p in enumerate(ROW_ORDER) if r["row"].startswith(p)))


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


def write_results(out: Path, result: dict) -> None:
    """``results.json`` (everything) and ``results.md`` (provenance, the table, the calib grid, the verdicts)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    grid = "\n".join(f"| {g['lambda']:g} | {g['weight_each']} | {pct(g['average'])} |"
                     for g in result["ta_grid_calib"] or [])
    (out / "results.md").write_text(
        f"# Routing end to end (test split, {result['n_test_per_task']} per task)\n\n`{result['command']}` — "
        f"commit {result['git_commit']}, {result['date']}, wall {result['wall_s'] / 60:.1f} min\n\n"
        f"{markdown(result['rows'], result['tasks'])}\n## Uniform TA over LoRA experts on calib "
        f"({result['n_calib_per_task']} per task)\n\n| lambda | weight each | calib avg |\n| ---: | ---: | ---: |\n"
        f"{grid}\n\n## Verdicts\n\n```json\n{json.dumps(result['verdicts'], indent=2)}\n```\n")
