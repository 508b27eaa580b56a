"""Merging all six real-suite skills into one model, against per-request routing.

    .venv/bin/python -m bench.quality.real_merging     # -> results/quality/real/merging.{json,md}

The six full fine-tunes' task vectors (SmolLM2-135M-Instruct) merged into one
set of weights, theta = theta_base + lambda * merge(tau_1..6), with each method
of experts.merge at its default options (the registry's), and the pruned-then-
added variant of the NPS paper's eq. 7: each tau pruned first (NPS at r = 0.05,
with the band weights the compression bench's NPS cells searched on calibration,
results/quality/real/cells.jsonl; magnitude and DARE at r = 0.05 beside it),
then added. lambda is chosen on the
calibration split only (mean teacher-forced graded score over the six skills,
32 examples each) from LAMBDAS; the test split (64 per skill) is scored once at
that lambda. Scores are teacher-forced exact match, which equals greedy exact
match (experts/calibration.py). The experts alone and the base are scored the
same way, and the routed reference comes from the end-to-end run
(results/routing/real_e2e: `auto` through the server).

    .venv/bin/python -m bench.quality.real_merging --methods pruned:nps --update

recomputes only the named rows and keeps the others (the update's command,
commit and date are listed under "updates").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.common import REPO, built_real_suite, log, provenance

OUT = REPO / "results" / "quality" / "real"
LAMBDAS = (0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0)
CALIB, TEST = 32, 64
PRUNE_DENSITY = 0.05
NPS_BANDS = 8              # experts.compress.NpsOptions' default, what the compression cells searched
CELLS = OUT / "cells.jsonl"


def methods() -> list[tuple[str, str, dict]]:
    """(label, merge method, options); pruned variants prune each tau first, then add (task arithmetic)."""
    return [("task arithmetic", "task_arithmetic", {}), ("TIES", "ties", {}), ("DARE-TIES", "dare_ties", {}),
            ("PCB", "pcb", {}), (f"magnitude r={PRUNE_DENSITY} pruned, added (eq. 7)", "pruned:magnitude", {}),
            (f"DARE r={PRUNE_DENSITY} pruned, added (eq. 7)", "pruned:dare", {}),
            (f"NPS r={PRUNE_DENSITY} pruned, added (eq. 7)", "pruned:nps", {})]


def nps_weights(skills: list[str], cells: Path = CELLS) -> list[list[float]]:
    """Each skill's NPS band weights at PRUNE_DENSITY, as the compression bench searched them (on the
    calibration split; its test scores are not used here)."""
    found = {}
    for line in cells.read_text().splitlines():
        cell = json.loads(line)
        if cell["method"] == "nps" and cell["options"].get("density") == PRUNE_DENSITY:
            found[cell["skill"]] = cell["nps"]["weights"]
    missing = [s for s in skills if s not in found]
    if missing:
        raise SystemExit(f"no NPS cell at r={PRUNE_DENSITY} for {missing} in {cells}: run "
                         f"`.venv/bin/python -m bench.quality.real_compression --skills {' '.join(missing)} "
                         f"--nps-skills {' '.join(missing)} --nps-densities {PRUNE_DENSITY}` first")
    return [found[s] for s in skills]


def merged_deltas(taus: list[dict], method: str, options: dict, scale: float,
                  band_weights: list[list[float]] | None = None) -> dict[str, torch.Tensor]:
    from deltaserve.experts.merge import get_merge_method
    from deltaserve.experts.nps_bands import BandPruner
    from deltaserve.experts.sparsify import dare, magnitude

    names = sorted({n for t in taus for n in t})
    out = {}
    if method == "pruned:nps":      # global banding over each whole tau, as `compress --method nps` stores it
        if band_weights is None or len(band_weights) != len(taus):
            raise ValueError("pruned:nps needs one list of band weights per tau")
        pruned = [BandPruner(t, NPS_BANDS, PRUNE_DENSITY)(w) for t, w in zip(taus, band_weights)]
        return {name: scale * torch.stack([p[name] for p in pruned if name in p]).sum(0) for name in names}
    if method.startswith("pruned:"):
        kind = method.split(":", 1)[1]
        gen = torch.Generator().manual_seed(0)
        for name in names:
            parts = [t[name] for t in taus if name in t]
            pruned = [magnitude(p, PRUNE_DENSITY) if kind == "magnitude" else dare(p, PRUNE_DENSITY, gen)
                      for p in parts]
            out[name] = scale * torch.stack(pruned).sum(0)
        return out
    merge = get_merge_method(method)
    runtime = {"generator": torch.Generator().manual_seed(0)} if "generator" in merge.runtime else {}
    for name in names:
        parts = [t.get(name, torch.zeros_like(next(x[name] for x in taus if name in x))) for t in taus]
        out[name] = scale * merge(parts, [1.0] * len(parts), **options, **runtime)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--methods", nargs="+", choices=[m for _, m, _ in methods()],
                    help="compute only these rows (default: all)")
    ap.add_argument("--update", action="store_true", help="keep the other rows of the existing merging.json")
    args = ap.parse_args(argv)
    record = provenance(argv=argv)
    previous = json.loads((args.out / "merging.json").read_text()) if args.update else None
    chosen = [m for m in methods() if args.methods is None or m[1] in args.methods]
    from deltaserve.experts.atomic import write_bytes_atomic
    from deltaserve.experts.calibration import DeltaObjective, TeacherForcedScorer
    from deltaserve.experts.compress import extract
    from deltaserve.experts.hfmodel import load_causal_lm, load_tokenizer
    from deltaserve_zoo.real.skills import get_skill

    builder = built_real_suite()
    skills = list(builder.spec.skills)
    base = builder.layout.base
    model, tokenizer = load_causal_lm(base), load_tokenizer(base)

    def objectives(split: str, n: int) -> dict[str, DeltaObjective]:
        return {s: DeltaObjective(model, TeacherForcedScorer(tokenizer, get_skill(s).examples(split, n)))
                for s in skills}

    calib, test = objectives("calib", CALIB), objectives("test", TEST)
    taus = [extract(base, builder.layout.full(s)).deltas for s in skills]
    band_weights = nps_weights(skills) if any(m == "pruned:nps" for _, m, _ in chosen) else None

    def scores(objs: dict[str, DeltaObjective], deltas: dict) -> dict[str, float]:
        return {s: 100 * o.evaluate(deltas).exact for s, o in objs.items()}

    if previous is None:
        rows = [{"label": "base", "test": scores(test, {})},
                {"label": "each full fine-tune on its own skill",
                 "test": {s: 100 * test[s].evaluate(t).exact for s, t in zip(skills, taus)}}]
    else:
        rows = [r for r in previous["rows"] if r.get("method") not in {m for _, m, _ in chosen}]
    for label, method, options in chosen:
        started, sweep = time.perf_counter(), {}
        unit = merged_deltas(taus, method, options, 1.0, band_weights)   # merged once; lambda only scales it

        def scaled(lam: float, unit: dict = unit) -> dict[str, torch.Tensor]:
            return {name: lam * t for name, t in unit.items()}

        for lam in LAMBDAS:
            sweep[lam] = sum(calib[s].evaluate(scaled(lam)).graded for s in skills) / len(skills)
            log(f"{label}: lambda {lam} calib graded {sweep[lam]:.3f}")
        best = max(sweep, key=sweep.get)
        row = {"label": label, "method": method, "options": options, "lambda": best, "calib_sweep": sweep,
               "test": scores(test, scaled(best)),
               "seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        log(f"{label}: lambda {best} -> test {sum(row['test'].values()) / len(skills):.1f} %")
    order = [m for _, m, _ in methods()]          # the table's order, whichever rows this run computed
    rows.sort(key=lambda r: order.index(r["method"]) + 1 if r.get("method") in order else 0)
    for row in rows:
        row["avg"] = sum(row["test"].values()) / len(skills)
    routed = json.loads((REPO / "results" / "routing" / "real_e2e" / "results.json").read_text())["rows"]
    auto = {k: v["avg"] for k, v in routed.items() if k.startswith("auto/")}
    table = ["| model | λ (calib) | " + " | ".join(skills) + " | avg |", "|---|---:|" + "---:|" * (len(skills) + 1)]
    for row in rows:
        table.append(f"| {row['label']} | {row.get('lambda', '')} | "
                     + " | ".join(f"{row['test'][s]:.1f}" for s in skills) + f" | {row['avg']:.1f} |")
    for k, v in auto.items():
        table.append(f"| {k} (through the server, results/routing/real_e2e) | | " + " | ".join("" for _ in skills)
                     + f" | {v:.1f} |")
    md = "\n".join(table)
    print(md)
    if previous is not None:
        update = {**record, "methods": [m for _, m, _ in chosen]}
        record = {k: previous[k] for k in record} | {"updates": [*previous.get("updates", []), update]}
    header = f"`{record['command']}` ({record['git_commit'][:10]}, {record['date']})"
    for update in record.get("updates", []):
        header += f"; rows {', '.join(update['methods'])} from `{update['command']}` " \
                  f"({update['git_commit'][:10]}, {update['date']})"
    args.out.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(args.out / "merging.md", (header + "\n\n" + md + "\n").encode())
    write_bytes_atomic(args.out / "merging.json",
                       (json.dumps({**record, "skills": skills, "rows": rows, "auto": auto}, indent=2) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
