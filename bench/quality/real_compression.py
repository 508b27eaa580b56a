"""Compression on the real suite: accuracy retained vs bits per base parameter, every compressor.

    .venv/bin/python -m bench.quality.real_compression --out results/quality/real

For each skill of the real suite (SmolLM2-135M-Instruct, zoo.real) the full
fine-tune's task vector is compressed by every method at every setting, stored
as a real expert (its exact bytes are what the table counts), added back to the
base and scored by teacher-forced exact match (experts.calibration: equal to
greedy exact match, one forward pass) on the skill's *test* split. NPS searches
on the *calibration* split only. Cells are appended to ``cells.jsonl`` as they
finish, so an interrupted run resumes; the tables (markdown, JSON, PNG) are
written from all cells at the end.

"Retained" is the mean over skills of (compressed accuracy / full fine-tune
accuracy), as in the NPS paper's normalised accuracy. "bits/param" is 8 x the
stored expert's tensor bytes / the base's parameter count (134.5 M).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from bench.common import built_real_suite, log, provenance

DENSITIES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
DARE_SEEDS = (0, 1, 2)
LOWRANK_RANKS = (1, 4, 16)
NPS_DENSITIES = (0.01, 0.05)
SIGN_DENSITIES = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05)   # --sign-values: values="sign" cells
TEST_EXAMPLES = 64
CALIB_EXAMPLES = 64


def settings(nps_generations: int, nps: bool = True, dare_seeds: tuple[int, ...] = DARE_SEEDS,
             nps_densities: tuple[float, ...] = NPS_DENSITIES, sign_values: bool = False) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = [("dense", {}), ("bitdelta", {})]
    for d in DENSITIES:
        out += [("magnitude", {"density": d}), ("tswitch", {"density": d})]
        out += [("dare", {"density": d, "seed": s}) for s in dare_seeds]
    out += [("lowrank", {"rank": r}) for r in LOWRANK_RANKS]
    if nps:
        out += [("nps", {"density": d, "generations": nps_generations}) for d in nps_densities]
    if sign_values:   # sign-valued supports (sign_ef codec): one sign bit per kept entry
        for d in SIGN_DENSITIES:
            out += [("magnitude", {"density": d, "values": "sign"}),
                    ("dare", {"density": d, "seed": dare_seeds[0], "values": "sign"})]
    return out


def cell_key(skill: str, method: str, options: dict) -> str:
    return json.dumps([skill, method, options], sort_keys=True)


def run_cells(root: Path, out: Path, nps_generations: int, skills: list[str] | None,
              nps_skills: list[str] | None = None, dare_seeds: tuple[int, ...] = DARE_SEEDS,
              nps_densities: tuple[float, ...] = NPS_DENSITIES, sign_values: bool = False) -> None:
    from deltaserve.experts.calibration import DeltaObjective, TeacherForcedScorer
    from deltaserve.experts.compress import compress_expert, extract
    from deltaserve.experts.expert import load_expert
    from deltaserve.experts.hfmodel import load_causal_lm, load_tokenizer
    from deltaserve_zoo.real.skills import get_skill

    builder = built_real_suite(root)
    cells_path = out / "cells.jsonl"
    done = {json.loads(line)["key"] for line in cells_path.read_text().splitlines()} if cells_path.exists() else set()
    base = builder.layout.base
    model, tokenizer = load_causal_lm(base), load_tokenizer(base)
    base_params = sum(p.numel() for p in model.parameters())
    for skill_name in skills or builder.spec.skills:
        skill = get_skill(skill_name)
        test = DeltaObjective(model, TeacherForcedScorer(tokenizer, skill.examples("test", TEST_EXAMPLES)))
        calib = DeltaObjective(model, TeacherForcedScorer(tokenizer, skill.examples("calib", CALIB_EXAMPLES)))
        tv = extract(base, builder.layout.full(skill_name))
        base_key = cell_key(skill_name, "base", {})
        if base_key not in done:
            _append(cells_path, {"key": base_key, "skill": skill_name, "method": "base", "options": {},
                                 "test_exact": test.evaluate({}).exact, "bits_per_param": 0.0})
        for method, options in settings(nps_generations, nps_skills is None or skill_name in nps_skills,
                                          dare_seeds, nps_densities, sign_values):
            key = cell_key(skill_name, method, options)
            if key in done:
                continue
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                manifest = compress_expert(tv, Path(tmp) / "e", name="e", method=method, progress=False,
                                           objective=calib if method == "nps" else None, **options)
                compress_s = time.perf_counter() - started
                deltas = dict(load_expert(Path(tmp) / "e").iter_deltas(torch.float32))
            score = test.evaluate(deltas)
            cell = {"key": key, "skill": skill_name, "method": method, "options": options,
                    "test_exact": score.exact, "test_token_accuracy": score.token_accuracy,
                    "bytes": manifest.bytes, "bits_per_param": 8 * manifest.bytes / base_params,
                    "compress_seconds": round(compress_s, 2)}
            if method == "nps":
                cell["nps"] = {k: manifest.method.get(k) for k in ("weights", "history", "evaluations", "stop_reason",
                                                                  "search_seconds", "baseline_score")}
                cell["calib_score"] = manifest.calibration_score
            _append(cells_path, cell)
            log(f"{skill_name:13s} {method:9s} {json.dumps(options):40s} test {score.exact:6.1%} "
                f"{cell['bits_per_param']:.3f} bits/param ({compress_s:.0f} s)")


def tau_stats(root: Path, out: Path) -> dict:
    """Why magnitude pruning fails here: how flat |tau| is, and the share of its mass the top r keeps
    (per skill; cached in tau_stats.json)."""
    from deltaserve.experts.compress import extract
    from deltaserve_zoo.real.build import RealSuiteBuilder

    path = out / "tau_stats.json"
    if path.exists():
        return json.loads(path.read_text())
    builder = RealSuiteBuilder(root)
    stats = {}
    for skill in builder.spec.skills:
        x = torch.cat([t.abs().reshape(-1).float() for t in extract(builder.layout.base,
                                                                    builder.layout.full(skill)).deltas.values()])
        sample = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))[:5_000_000]]
        q = torch.quantile(sample, torch.tensor([0.5, 0.99, 0.999])).tolist()
        row = {"median": q[0], "p99": q[1], "p99.9": q[2], "zero_share": float((x == 0).float().mean())}
        for r in (0.01, 0.05):
            top = torch.topk(x, int(r * x.numel())).values
            row[f"top{r}_l1_share"] = float(top.sum() / x.sum())
        stats[skill] = row
    path.write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def _append(path: Path, cell: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(cell) + "\n")


def summarise(out: Path, skills: list[str] | None = None) -> dict:
    """Rows averaged over ``skills`` (default: the skills every non-NPS setting has a cell for, so rows
    compare like with like; NPS rows over the skills it was run on, see ``nps_comparison``)."""
    cells = [json.loads(line) for line in (out / "cells.jsonl").read_text().splitlines()]
    if skills is None:
        settings_of: dict[str, set] = defaultdict(set)
        for c in cells:
            if c["method"] != "nps":
                settings_of[c["skill"]].add(cell_key("", c["method"], {k: v for k, v in c["options"].items()
                                                                         if k != "seed"}))
        everything = set().union(*settings_of.values())
        skills = [s for s, have in settings_of.items() if have == everything]
    cells = [c for c in cells if c["skill"] in skills or (c["method"] == "nps" and c["skill"] in
                                                             {x["skill"] for x in cells if x["method"] == "dense"})]
    full = {c["skill"]: c["test_exact"] for c in cells if c["method"] == "dense"}
    base = {c["skill"]: c["test_exact"] for c in cells if c["method"] == "base"}
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in cells:
        if c["skill"] in full and c["method"] != "base":
            opts = {k: v for k, v in c["options"].items() if k not in ("seed", "generations")}
            groups[(c["method"], json.dumps(opts, sort_keys=True))].append(c)
    rows = []
    for (method, opts), group in groups.items():
        per_skill: dict[str, list[float]] = defaultdict(list)
        for c in group:
            per_skill[c["skill"]].append(c["test_exact"])
        seeds = max(len(v) for v in per_skill.values())
        # DARE: mean and best-of-seeds per skill
        mean_acc = {s: sum(v) / len(v) for s, v in per_skill.items()}
        best_acc = {s: max(v) for s, v in per_skill.items()}
        retained = sum(mean_acc[s] / full[s] for s in mean_acc if full[s]) / len(mean_acc)
        rows.append({"method": method, "options": json.loads(opts), "skills": len(per_skill), "seeds": seeds,
                     "accuracy": sum(mean_acc.values()) / len(mean_acc), "retained": retained,
                     "retained_best_seed": sum(best_acc[s] / full[s] for s in best_acc if full[s]) / len(best_acc),
                     "bits_per_param": sum(c["bits_per_param"] for c in group) / len(group),
                     "per_skill": mean_acc})
    rows.sort(key=lambda r: (r["method"], r["bits_per_param"]))
    return {"full_accuracy": {s: a for s, a in full.items() if s in skills}, "base_accuracy": base, "rows": rows,
            "skills": list(skills), "nps_comparison": nps_comparison(cells)}


def nps_comparison(cells: list[dict]) -> list[dict]:
    """On each skill with NPS cells: NPS vs magnitude vs DARE (mean and best of its seeds) at NPS's densities."""
    out = []
    for c in [c for c in cells if c["method"] == "nps"]:
        d, skill = c["options"]["density"], c["skill"]
        same = [x for x in cells if x["skill"] == skill and x["options"].get("density") == d]
        dare = [x["test_exact"] for x in same if x["method"] == "dare"]
        mag = [x["test_exact"] for x in same if x["method"] == "magnitude"]
        out.append({"skill": skill, "density": d, "nps": c["test_exact"], "magnitude": mag[0] if mag else None,
                    "dare_mean": sum(dare) / len(dare) if dare else None, "dare_best": max(dare, default=None),
                    "search_seconds": (c.get("nps") or {}).get("search_seconds"),
                    "evaluations": (c.get("nps") or {}).get("evaluations")})
    return out


def write_tables(out: Path, summary: dict, meta: dict) -> None:
    lines = [f"# Compression on the real suite (SmolLM2-135M-Instruct, {len(summary['full_accuracy'])} skills: "
             f"{', '.join(summary['full_accuracy'])})", "",
             f"Command: `{meta['command']}`  ", f"Commit: `{meta['git_commit']}`, date {meta['date']}", "",
             "Teacher-forced exact match on each skill's test split (64 prompts); retained = mean over skills of "
             "compressed / full fine-tune accuracy; bits/param = 8 x stored tensor bytes / 134.5 M base params. "
             "DARE: mean over its seeds (best seed in brackets; the seeds column). "
             "NPS searched on the calibration split.", "",
             "| method | setting | skills | seeds | bits/param | accuracy | retained |",
             "|---|---|---:|---:|---:|---:|---:|"]
    full = summary["full_accuracy"]
    lines.insert(5, "Full fine-tunes: " + ", ".join(f"{s} {a:.1%}" for s, a in full.items()) + "; base: "
                 + ", ".join(f"{s} {a:.1%}" for s, a in summary["base_accuracy"].items()) + "  ")
    for r in summary["rows"]:
        setting = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "-"
        best = f" ({r['retained_best_seed']:.1%})" if r["seeds"] > 1 else ""
        lines.append(f"| {r['method']} | {setting} | {r['skills']} | {r['seeds']} | {r['bits_per_param']:.3f} | "
                     f"{r['accuracy']:.1%} | "
                     f"{r['retained']:.1%}{best} |")
    if summary.get("nps_comparison"):
        lines += ["", "NPS against magnitude and DARE on the same skill and density (test exact match; NPS's "
                  "search time at the default budget, 20 generations of pycma's default population):", "",
                  "| skill | density | magnitude | NPS | DARE (mean / best seed) | NPS search s | evaluations |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in summary["nps_comparison"]:
            def pct(x):
                return "" if x is None else f"{x:.1%}"
            lines.append(f"| {r['skill']} | {r['density']} | {pct(r['magnitude'])} | {pct(r['nps'])} | "
                         f"{pct(r['dare_mean'])} / {pct(r['dare_best'])} | {r['search_seconds']} | "
                         f"{r['evaluations']} |")
    stats = summary.get("tau_stats") or {}
    if stats:
        lines += ["", "Why magnitude-based pruning fails on these task vectors: |tau| is flat (30 Adam steps "
                  "move almost every weight by a similar amount), so the largest entries hold little of it:", "",
                  "| skill | median abs(tau) | 99.9th pct / median | L1 share of the top 1 % | of the top 5 % |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {k} | {v['median']:.2e} | {v['p99.9'] / v['median']:.1f}x | {v['top0.01_l1_share']:.1%} | "
                  f"{v['top0.05_l1_share']:.1%} |" for k, v in stats.items()]
    (out / "compression.md").write_text("\n".join(lines) + "\n")
    (out / "compression.json").write_text(json.dumps({**meta, **summary}, indent=1) + "\n")
    _plot(out / "compression.png", summary["rows"])


def _plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[r["method"] + (" (sign values)" if r["options"].get("values") == "sign" else "")].append(r)
    for method, group in sorted(by_method.items()):
        group.sort(key=lambda r: r["bits_per_param"])
        ax.plot([r["bits_per_param"] for r in group], [100 * r["retained"] for r in group], "o-", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("bits per base parameter (stored bytes)")
    ax.set_ylabel("% of full fine-tune accuracy retained")
    ax.set_title("Real suite (SmolLM2-135M-Instruct): compression")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(".cache/zoo/real"))
    parser.add_argument("--out", type=Path, default=Path("results/quality/real"))
    parser.add_argument("--skills", nargs="*", help="default: every skill of the suite")
    parser.add_argument("--nps-generations", type=int, default=20)
    parser.add_argument("--nps-skills", nargs="*", help="skills that get NPS cells (default: all)")
    parser.add_argument("--dare-seeds", type=int, nargs="+", default=list(DARE_SEEDS))
    parser.add_argument("--nps-densities", type=float, nargs="+", default=list(NPS_DENSITIES))
    parser.add_argument("--sign-values", action="store_true",
                        help=f"also magnitude and DARE with values=sign at {list(SIGN_DENSITIES)}")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the tables from cells.jsonl")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = provenance(argv=argv)
    if not args.tables_only:
        run_cells(args.root, args.out, args.nps_generations, args.skills, args.nps_skills, tuple(args.dare_seeds),
                  tuple(args.nps_densities), args.sign_values)
    summary = summarise(args.out)   # every cell of cells.jsonl, whichever run made it
    summary["tau_stats"] = tau_stats(args.root, args.out)
    write_tables(args.out, summary, meta)
    print((args.out / "compression.md").read_text())


if __name__ == "__main__":
    main()
