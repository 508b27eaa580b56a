"""The LLM probes of bench.quality.probes: search budget, masked re-training, smaller lrs.

``refinetune`` repeats the zoo's full fine-tune of one task from the base (same
examples, order and steps), at another lr and/or with only a top-r magnitude
support of the zoo's tau trainable; the probes score what NPS and the other
compressors make of the results with the quality tables' own code.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench.quality import suites as qs
from bench.quality import tables as qt
from bench.quality.report import METHOD_LABELS
from deltaserve.experts import sparsify

LEARNED = 0.5  # own test accuracy below which a re-trained LLM expert counts as not learned


# ------------------------------------------------------------------ search and masked (llm)


def run_search(zoo: Path, budget: qs.Budget, configs: Sequence[dict], cache: qs.CellCache, workdir: Path,
               log, tasks: Sequence[str]) -> dict:
    """NPS at budget.interp_density under each search config; test accuracy of the found expert."""
    suite = qs.llm_suite(zoo, tasks, budget)
    own = {t: cache.get(f"finetuned/{t}", lambda t=t: {"accuracy": suite.score(
        suite.tvs[t].deltas, [t], "test")})["accuracy"][t] for t in tasks}
    density = budget.interp_density
    rows = {}
    for config in configs:
        label = json.dumps(config, sort_keys=True)
        cells = {}
        for task in tasks:
            def make(task=task, config=config):
                deltas, manifest = qt.stored(
                    suite.tvs[task], "nps", workdir, density=density, seed=budget.seed,
                    objective=suite.objective(task), bands=budget.bands, per_tensor=budget.per_tensor,
                    population=budget.population, **config)
                m = manifest["method"]
                return {"accuracy": suite.score(deltas, [task], "test")[task], "calibration": manifest["calibration_score"],
                        "baseline_calibration": m["baseline_score"], "weights": m["weights"],
                        "evaluations": m["evaluations"], "search_seconds": m["search_seconds"], "history": m["history"]}
            cells[task] = cache.get(f"search/{label}/{task}/{density}", make)
        rows[label] = {"config": config, "cells": cells,
                       "retained_pct": qt._mean(qt._retained(cells[t]["accuracy"], own[t]) for t in tasks),
                       "calib_mean": qt._mean(c["calibration"] for c in cells.values()),
                       "at_max_weight": sum(max(c["weights"]) >= config["max_weight"] - 0.01 for c in cells.values())}
        log(f"search {label}: retained {rows[label]['retained_pct']:.1f} %, calib {rows[label]['calib_mean']:.3f}")
    return {"own_accuracy": own, "rows": rows}


def refinetune(zoo: Path, task: str, *, lr: float | None = None, density: float | None = None):
    """The zoo's full fine-tune of ``task`` repeated from the base (same examples, data order, steps),
    at ``lr`` instead of the zoo's when given, and with only the top-``density`` entries of the
    zoo's tau (per tensor, by magnitude) trainable when given. Returns (deltas, final loss)."""
    from deltaserve.experts.taskvector import extract_full
    from deltaserve_zoo.build import ZooLayout, refinetune as zoo_refinetune
    from deltaserve_zoo.spec import ZooSpec

    layout = ZooLayout(Path(zoo))
    spec = ZooSpec.model_validate(json.loads((layout.root / "spec.json").read_text()))
    recipe = spec.full if lr is None else spec.full.model_copy(update={"lr": lr})
    masks = None
    if density is not None:
        tau = extract_full(layout.base, layout.full(task)).deltas
        masks = {name: sparsify.magnitude_mask(t, density) for name, t in tau.items()}
    deltas, loss = zoo_refinetune(layout.base, task, recipe, spec.seed, masks)
    outside = sum(int(deltas[k][~m].count_nonzero()) for k, m in (masks or {}).items())
    if outside:
        raise AssertionError(f"{outside} entries outside the mask moved")  # AdamW with weight_decay 0
    return deltas, loss


def masked_finetune(zoo: Path, task: str, density: float):
    """Re-train the zoo's fine-tune with only the top-``density`` magnitude entries of its tau trainable."""
    return refinetune(zoo, task, density=density)


def lr_task_vectors(zoo: Path, lr: float, tasks: Sequence[str], cache_dir: Path, log) -> dict:
    """{task: TaskVector} of the zoo's fine-tunes re-run at ``lr`` (cached as safetensors)."""
    from safetensors.torch import load_file, save

    from deltaserve.experts.atomic import write_bytes_atomic
    from deltaserve.experts.taskvector import TaskVector, extract_full
    from deltaserve_zoo.build import ZooLayout

    layout = ZooLayout(Path(zoo))
    tvs = {}
    for task in tasks:
        reference = extract_full(layout.base, layout.full(task))
        path = cache_dir / f"lr{lr:g}-{task}.safetensors"
        if not path.is_file():
            started = time.perf_counter()
            deltas, loss = refinetune(zoo, task, lr=lr)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(path, save({k: v.contiguous() for k, v in deltas.items()}))
            log(f"re-fine-tuned {task} at lr {lr:g}: loss {loss:.3f}, {time.perf_counter() - started:.0f} s")
        deltas = load_file(path)
        tvs[task] = TaskVector({k: deltas[k] for k in reference.deltas}, reference.base_fingerprint, "full",
                               f"{reference.source} re-fine-tuned at lr {lr:g}", reference.carried)
    return tvs


def run_lr(zoo: Path, lrs: Sequence[float], out: Path, cache_dir: Path, log, tasks: Sequence[str],
           budget: qs.Budget = qs.Budget(densities=(0.05,))) -> dict:
    """Compression at r = 0.05 (the tables' LLM budget) of LLM task vectors fine-tuned at other lrs."""
    rows = {}
    for lr in lrs:
        cache = qs.CellCache(out / f"cells-llm-lr{lr:g}.jsonl", budget.key())
        needed = ["energy"] + [f"finetuned/{t}" for t in tasks] + [
            f"compress/{t}/{m}/{d}" for d in budget.densities for m in qt.COMPRESSORS for t in tasks]
        if all(key in cache.cells for key in needed):  # everything cached: no re-training, no model
            suite = qs.Suite("llm", list(tasks), {}, score=None, objective=None)
        else:
            suite = qs.llm_suite(zoo, tasks, budget, tvs=lr_task_vectors(zoo, lr, tasks, cache_dir, log))
        with tempfile.TemporaryDirectory(prefix="probes-") as scratch:
            comp = qt.run_compression(suite, budget, cache, Path(scratch), log)
        top = cache.get("energy", lambda: {"top_0.05": qt._mean(
            sum(float(sparsify.magnitude(t, 0.05).double().pow(2).sum()) for t in tv.deltas.values())
            / sum(float(t.double().pow(2).sum()) for t in tv.deltas.values()) for tv in suite.tvs.values())})["top_0.05"]
        own = comp["own_accuracy"]
        learned = [t for t in tasks if own[t] >= LEARNED]  # a failed fine-tune has nothing to retain
        rows[f"{lr:g}"] = {"lr": lr, "own_accuracy": own, "learned_tasks": learned,
                           "retained_pct": {k: qt._mean(qt._retained(v["per_task_accuracy"][t], own[t]) for t in learned)
                                            for k, v in comp["summary"].items()} if learned else {},
                           "bits_per_param": {k: v["bits_per_param"] for k, v in comp["summary"].items()},
                           "per_task_accuracy": {k: v["per_task_accuracy"] for k, v in comp["summary"].items()},
                           "energy_top_0.05": top}
        log(f"lr {lr:g}: fine-tuned {qt._mean(comp['own_accuracy'].values()):.3f}, retained "
            + ", ".join(f"{k} {v:.1f}%" for k, v in rows[f'{lr:g}']['retained_pct'].items()))
    return {"budget": asdict(budget), "rows": rows}


def run_masked(zoo: Path, budget: qs.Budget, densities: Sequence[float], cache: qs.CellCache, log,
               tasks: Sequence[str]) -> dict:
    suite = qs.llm_suite(zoo, tasks, budget)
    own = {t: cache.get(f"finetuned/{t}", lambda t=t: {"accuracy": suite.score(
        suite.tvs[t].deltas, [t], "test")})["accuracy"][t] for t in tasks}
    rows = {}
    for density in densities:
        cells = {}
        for task in tasks:
            def make(task=task, density=density):
                started = time.perf_counter()
                deltas, loss = masked_finetune(zoo, task, density)
                seconds = time.perf_counter() - started
                magnitude = {k: sparsify.magnitude(v, density) for k, v in suite.tvs[task].deltas.items()}
                return {"accuracy": suite.score(deltas, [task], "test")[task], "final_loss": loss,
                        "train_seconds": round(seconds, 1),
                        "kept": sum(int(v.count_nonzero()) for v in deltas.values()),
                        "entries": sum(v.numel() for v in deltas.values()),
                        "magnitude_accuracy": suite.score(magnitude, [task], "test")[task]}
            cells[task] = cache.get(f"masked/{task}/{density}", make)
        rows[str(density)] = {
            "cells": cells,
            "retained_pct": qt._mean(qt._retained(cells[t]["accuracy"], own[t]) for t in tasks),
            "magnitude_retained_pct": qt._mean(qt._retained(cells[t]["magnitude_accuracy"], own[t]) for t in tasks),
            "kept_density": sum(c["kept"] for c in cells.values()) / sum(c["entries"] for c in cells.values()),
        }
        log(f"masked r={density}: retained {rows[str(density)]['retained_pct']:.1f} % "
            f"(magnitude on the same support {rows[str(density)]['magnitude_retained_pct']:.1f} %)")
    return {"own_accuracy": own, "rows": rows}


def slim_reference(tables: dict, zoo_lr: float) -> dict:
    """What lr_table reads from the quality tables' llm.json, and where it came from."""
    comp = tables["compression"]
    return {"source": "results/quality/llm.json", "zoo_lr": zoo_lr, "command": tables["command"], "git_commit": tables["git_commit"],
            "budget": tables["budget"], "diagnostics": tables["diagnostics"],
            "compression": {"own_accuracy": comp["own_accuracy"], "summary": {
                k: {"per_task_accuracy": v["per_task_accuracy"]} for k, v in comp["summary"].items() if k.endswith("/0.05")}}}


def lr_table(lr: dict, reference: dict | None) -> str:
    """One row per fine-tune lr: own accuracy, and % retained at r = 0.05 over the tasks that learned.
    ``reference``: the quality tables' llm.json (the zoo's own lr), scored over the same tasks."""
    methods = ("magnitude", "dare", "tswitch", "lowrank", "nps")
    lines = ["| LLM fine-tune lr | fine-tuned (mean, 6 tasks) | tasks that learned (≥ 50 %) | "
             + " | ".join(f"{METHOD_LABELS[m]}" for m in methods) + " | top-5 % energy |",
             "|---|---:|---|" + "---:|" * (len(methods) + 1)]
    rows = list(lr["rows"].values())
    learned = rows[0]["learned_tasks"] if rows else []
    if reference:
        comp, own = reference["compression"], reference["compression"]["own_accuracy"]
        cells = [qt._mean(qt._retained(comp["summary"][f"{m}/0.05"]["per_task_accuracy"][t], own[t]) for t in learned)
                 for m in methods]
        energy = reference["diagnostics"]["tau_energy_share_top_0.05_per_tensor"]
        lines.append(f"| {reference['zoo_lr']:g} (the zoo's; quality tables) | "
                     f"{100 * qt._mean(own.values()):.1f} | same {len(learned)} | "
                     + " | ".join(f"{c:.1f} %" for c in cells) + f" | {100 * energy:.1f} % (all 6) |")
    for row in rows:
        own = row["own_accuracy"]
        retained = [row["retained_pct"].get(f"{m}/0.05") for m in methods]
        lines.append(f"| {row['lr']:g} | {100 * qt._mean(own.values()):.1f} | {', '.join(row['learned_tasks']) or 'none'} | "
                     + " | ".join("–" if r is None else f"{r:.1f} %" for r in retained)
                     + f" | {100 * row['energy_top_0.05']:.1f} % |")
    return "\n".join(lines) + "\n"


def llm_tables(search: dict | None, masked: dict | None, tasks: Sequence[str]) -> str:
    parts = []
    if search:
        lines = ["| NPS search (r = 0.05) | " + " | ".join(tasks) + " | retained | calib (mean) | "
                 "searches at the weight cap | evaluations | seconds per search |",
                 "|---|" + "---:|" * (len(tasks) + 5)]
        for row in search["rows"].values():
            c, cells = row["config"], row["cells"]
            lines.append(f"| {c['generations']} generations, weights in [0, {c['max_weight']:g}] | "
                         + " | ".join(f"{100 * cells[t]['accuracy']:.1f}" for t in tasks)
                         + f" | **{row['retained_pct']:.1f} %** | {row['calib_mean']:.3f} | {row['at_max_weight']}/{len(cells)} | "
                         f"{qt._mean(x['evaluations'] for x in cells.values()):.0f} | "
                         f"{qt._mean(x['search_seconds'] for x in cells.values()):.0f} |")
        parts.append("\n".join(lines) + "\n")
    if masked:
        lines = ["| support (top-r of τ per tensor) | " + " | ".join(tasks) + " | retained | τ's own values on it "
                 "(= magnitude) | seconds per re-train |", "|---|" + "---:|" * (len(tasks) + 3)]
        for density, row in masked["rows"].items():
            cells = row["cells"]
            lines.append(f"| r = {density} (kept {100 * row['kept_density']:.2f} %), re-trained | "
                         + " | ".join(f"{100 * cells[t]['accuracy']:.1f}" for t in tasks)
                         + f" | **{row['retained_pct']:.1f} %** | {row['magnitude_retained_pct']:.1f} % | "
                         f"{qt._mean(c['train_seconds'] for c in cells.values()):.0f} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)
