"""Quality tables: compression, interpolation and merging on the LLM and vision suites.

For each suite (LLM demo zoo full fine-tunes; digits-MLP vision suite):

1. compression: accuracy retained (% of the fine-tuned expert's own test
   accuracy) vs bits per base parameter, for magnitude, DARE, T-Switch,
   low-rank and NPS at each density. Every compressed expert is written with
   ``compress_expert``/``save_expert`` and read back, so accuracy is measured
   on what the store holds and bits come from the manifest's exact bytes.
2. interpolation: theta_base + lambda * tau_hat (NPS vs magnitude at one
   density, dense tau as reference): own-task and mean other-task accuracy.
3. merging all tasks: task arithmetic, TIES, DARE-TIES, PCB, and task
   arithmetic over NPS experts (paper eq. 7). lambda and trim density are
   chosen on the calib split; the chosen model is scored once on test.

Finished cells are appended to ``<out>/cells-<suite>.jsonl`` (keyed by a hash
of the budget), so a rerun resumes. Run single-threaded:

    TQDM_DISABLE=1 .venv/bin/python -m bench.quality.tables --suite llm --zoo .cache/zoo/demo --out results/quality/toy
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from torch import Tensor

from bench import common
from bench.common import provenance, zoo_spec
from bench.quality import report
from bench.quality.suites import DENSITIES, Budget, CellCache, Suite, llm_suite, vision_suite
from deltaserve.experts import sparsify
from deltaserve.experts.compress import COMPRESSORS as COMPRESSOR_REGISTRY
from deltaserve.experts.compress import compress_expert
from deltaserve.experts.expert import load_expert
from deltaserve.experts.save import save_expert
from deltaserve.experts.merge import get_merge_method
from deltaserve.experts.nps_bands import band_ids, nps_prune
from deltaserve.experts.taskvector import TaskVector

COMPRESSORS = ("magnitude", "dare", "tswitch", "lowrank", "nps")
VALUE_BITS = 16  # fp16 values/factors, as stored by compress_expert's default value_dtype


# ------------------------------------------------------------------ compression


def lowrank_rank(tv: TaskVector, density: float) -> int:
    """The rank whose fp16 factors take about the bits of a sparse expert at ``density``
    (1 mask bit + 16 value bits per kept entry); only used to pick the rank; the
    reported bits are the manifest's."""
    matrices = [t.shape for t in tv.deltas.values() if t.dim() == 2]
    bits_per_rank = VALUE_BITS * sum(m + n for m, n in matrices) / tv.num_params()
    return max(1, round((1 + VALUE_BITS * density) / bits_per_rank))


def _decoded(directory: Path) -> dict[str, Tensor]:
    return dict(load_expert(directory).iter_deltas(torch.float32))


def stored(tv: TaskVector, method: str, workdir: Path, objective=None, **candidates) -> tuple[dict[str, Tensor], dict]:
    """Compress with the registered compressor, publish, read back: (decoded deltas, manifest).

    ``candidates`` may hold options of several methods (a table row passes the same ones to
    all); only those ``method`` takes are passed on. ``per_tensor`` is NPS's ``banding``."""
    if "per_tensor" in candidates:
        candidates["banding"] = "per-tensor" if candidates.pop("per_tensor") else "global"
    valid = COMPRESSOR_REGISTRY.options_model(method).model_fields
    options = {k: v for k, v in candidates.items() if k in valid}
    out = Path(tempfile.mkdtemp(dir=workdir))
    manifest = compress_expert(tv, out / "e", name="e", method=method, options=options, objective=objective,
                               progress=False)
    return _decoded(out / "e"), manifest.model_dump(mode="json")


def nps_from_weights(tv: TaskVector, weights: Sequence[float], density: float, per_tensor: bool,
                     workdir: Path) -> dict[str, Tensor]:
    """A searched NPS expert rebuilt from its band weights (deterministic), stored and read back."""
    pruned = nps_prune(tv.deltas, band_ids(tv.deltas, len(weights), per_tensor), weights, density, per_tensor)
    out = Path(tempfile.mkdtemp(dir=workdir)) / "e"
    save_expert(out, pruned, name="e", base_fingerprint=tv.base_fingerprint, codec="sparse",
                source=tv.source, method={"name": "nps", "weights": list(weights)})
    return _decoded(out)


def compression_cell(suite: Suite, task: str, method: str, density: float, budget: Budget,
                     workdir: Path, seed: int | None = None) -> dict:
    tv = suite.tvs[task]
    options: dict = {"density": density, "seed": budget.seed if seed is None else seed}
    if method == "lowrank":
        options["rank"] = lowrank_rank(tv, density)
    if method == "nps":
        options.update(objective=suite.objective(task), generations=budget.generations,
                       population=budget.population, bands=budget.bands, per_tensor=budget.per_tensor)
    deltas, manifest = stored(tv, method, workdir, **options)
    keep = ("weights", "baseline_score", "history", "evaluations", "search_seconds", "banding")
    return {
        "accuracy": suite.score(deltas, [task], "test")[task],
        "bits_per_param": 8 * manifest["bytes"] / tv.num_params(),  # over every tau entry (lowrank drops 1-D)
        "manifest_bits_per_param": manifest["bits_per_param"],
        "bytes": manifest["bytes"], "kept_density": manifest["density"], "rank": manifest["rank"],
        "calibration_score": manifest["calibration_score"],
        "search": {k: v for k, v in manifest["method"].items() if k in keep} or None,
    }


def run_compression(suite: Suite, budget: Budget, cache: CellCache, workdir: Path, log,
                    dare_seeds: Sequence[int] = ()) -> dict:
    """The compression table. ``dare_seeds``: extra DARE seeds (beyond ``budget.seed``), reported as a
    spread; each is its own cell, so adding seeds never invalidates the cache."""
    finetuned = {t: cache.get(f"finetuned/{t}", lambda t=t: {"accuracy": suite.score(
        suite.tvs[t].deltas, suite.tasks, "test")}) for t in suite.tasks}
    own = {t: finetuned[t]["accuracy"][t] for t in suite.tasks}
    cells: dict[str, dict[str, dict]] = {}
    for density in budget.densities:
        for method in COMPRESSORS:
            for task in suite.tasks:
                cell = cache.get(f"compress/{task}/{method}/{density}",
                                 lambda task=task, method=method, density=density:
                                 compression_cell(suite, task, method, density, budget, workdir))
                cells.setdefault(f"{method}/{density}", {})[task] = cell
            row = cells[f"{method}/{density}"]
            bits = _mean(c["bits_per_param"] for c in row.values())
            retained = _mean(_retained(row[t]["accuracy"], own[t]) for t in suite.tasks)
            log(f"{suite.name} compress {method:9s} d={density:<5} bits={bits:.3f} retained={retained:.1f}%")
    extra = [seed for seed in dare_seeds if seed != budget.seed]
    dare_spread = {}
    for density in budget.densities if extra else ():
        retained = [cells[f"dare/{density}"]]
        for seed in extra:
            retained.append({task: cache.get(f"compress/{task}/dare/{density}/seed{seed}",
                                             lambda task=task, seed=seed, density=density:
                                             compression_cell(suite, task, "dare", density, budget, workdir, seed))
                             for task in suite.tasks})
        per_seed = [_mean(_retained(row[t]["accuracy"], own[t]) for t in suite.tasks) for row in retained]
        dare_spread[str(density)] = {"seeds": [budget.seed, *extra], "retained_pct": per_seed,
                                     "mean": _mean(per_seed), "min": min(per_seed), "max": max(per_seed)}
        log(f"{suite.name} compress DARE d={density:<5} seeds {[budget.seed, *extra]}: retained "
            f"{min(per_seed):.1f}..{max(per_seed):.1f}%")
    summary = {key: {"bits_per_param": _mean(c["bits_per_param"] for c in row.values()),
                     "accuracy": _mean(c["accuracy"] for c in row.values()),
                     "retained_pct": _mean(_retained(row[t]["accuracy"], own[t]) for t in suite.tasks),
                     "per_task_accuracy": {t: row[t]["accuracy"] for t in suite.tasks},
                     "rank": row[suite.tasks[0]]["rank"]}
               for key, row in cells.items()}
    return {"finetuned": finetuned, "own_accuracy": own, "summary": summary, "cells": cells,
            "dare_seeds": dare_spread}


def _retained(accuracy: float, own: float) -> float:
    return 100.0 * accuracy / own if own > 0 else float("nan")


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


# ------------------------------------------------------------------ interpolation and merging


def sparse_experts(suite: Suite, compression: dict, method: str, density: float, budget: Budget,
                   workdir: Path) -> dict[str, dict[str, Tensor]]:
    """tau_hat per task for ``method`` in {magnitude, nps} at ``density`` (NPS from its cached weights)."""
    out = {}
    for task, tv in suite.tvs.items():
        if method == "nps":
            search = compression["cells"][f"nps/{density}"][task]["search"]
            out[task] = nps_from_weights(tv, search["weights"], density, budget.per_tensor, workdir)
        else:
            out[task] = stored(tv, method, workdir, density=density, seed=budget.seed)[0]
    return out


def run_interpolation(suite: Suite, budget: Budget, cache: CellCache, experts: dict, log) -> dict:
    """theta_base + lambda * tau_hat: own-task and mean other-task test accuracy, averaged over tasks."""
    rows = {}
    for method, taus in experts.items():
        for lam in budget.interp_lambdas:
            per_task = {t: cache.get(f"interp/{method}/{t}/{lam}", lambda t=t, lam=lam, taus=taus: {
                "accuracy": suite.score({k: lam * v for k, v in taus[t].items()}, suite.tasks, "test")})["accuracy"]
                for t in suite.tasks}
            own = _mean(per_task[t][t] for t in suite.tasks)
            others = _mean(_mean(per_task[t][u] for u in suite.tasks if u != t) for t in suite.tasks)
            rows[f"{method}/{lam}"] = {"method": method, "lambda": lam, "own": own, "others": others,
                                       "per_task": per_task}
            log(f"{suite.name} interp {method:9s} lambda={lam:<4} own={own:.3f} others={others:.3f}")
    return rows


def merged_delta(taus: Sequence[Mapping[str, Tensor]], method: str, options: Mapping, seed: int) -> dict[str, Tensor]:
    """merge(tau_1..n) per parameter with unit weights (lambda is applied by the caller)."""
    merge = get_merge_method(method)
    generator = torch.Generator().manual_seed(seed) if method == "dare_ties" else None
    out = {}
    for name in sorted(set().union(*taus)):
        like = next(t[name] for t in taus if name in t)
        deltas = [t.get(name, torch.zeros_like(like)).float() for t in taus]
        extra = {"generator": generator} if generator is not None else {}
        merged = merge(deltas, [1.0] * len(deltas), **options, **extra)
        if not torch.isfinite(merged).all():
            raise ValueError(f"{method} {dict(options)} produced NaN/Inf in {name!r}")
        out[name] = merged
    return out


def merge_candidates(budget: Budget) -> list[tuple[str, str, str, dict]]:
    """(label, tau source, registered merge method, options) for every merge configuration searched."""
    out = [("task_arithmetic", "dense", "task_arithmetic", {})]
    out += [("ties", "dense", "ties", {"density": r}) for r in budget.trim_densities]
    out += [("dare_ties", "dense", "dare_ties", {"density": r}) for r in budget.trim_densities]
    out += [("pcb", "dense", "pcb", {"ratio": r}) for r in budget.trim_densities]
    out += [("magnitude_ta", "magnitude", "task_arithmetic", {}), ("nps_ta", "nps", "task_arithmetic", {})]
    return out


def run_merging(suite: Suite, budget: Budget, cache: CellCache, experts: dict, log) -> dict:
    """Pick (options, lambda) per method on calib (mean accuracy), then score that one model on test."""
    sources = {"dense": {t: tv.deltas for t, tv in suite.tvs.items()}, **experts}
    best: dict[str, dict] = {}
    for label, source, method, options in merge_candidates(budget):
        delta: dict[str, Tensor] | None = None
        for lam in budget.merge_lambdas:
            key = f"merge/{label}/{json.dumps(options, sort_keys=True)}/{lam}/calib"
            if key not in cache.cells and delta is None:
                delta = merged_delta([sources[source][t] for t in suite.tasks], method, options, budget.seed)
            cell = cache.get(key, lambda lam=lam, delta=delta: {"accuracy": suite.score(
                {k: lam * v for k, v in delta.items()}, suite.tasks, "calib")})
            mean = _mean(cell["accuracy"].values())
            if label not in best or mean > best[label]["calib_mean"]:
                best[label] = {"source": source, "method": method, "options": options, "lambda": lam,
                               "calib_mean": mean, "calib": cell["accuracy"]}
    for label, choice in best.items():
        def test_cell(choice=choice):
            delta = merged_delta([sources[choice["source"]][t] for t in suite.tasks], choice["method"],
                                 choice["options"], budget.seed)
            return {"accuracy": suite.score({k: choice["lambda"] * v for k, v in delta.items()}, suite.tasks, "test")}

        key = f"merge/{label}/{json.dumps(choice['options'], sort_keys=True)}/{choice['lambda']}/test"
        choice["test"] = cache.get(key, test_cell)["accuracy"]
        choice["test_mean"] = _mean(choice["test"].values())
        log(f"{suite.name} merge {label:15s} {choice['options']} lambda={choice['lambda']} "
            f"calib={choice['calib_mean']:.3f} test={choice['test_mean']:.3f}")
    return best


def diagnostics(suite: Suite, compression: dict, budget: Budget) -> dict:
    """Why the tables look as they do: how sparse / low-rank tau is, and how the NPS searches went."""
    density = budget.interp_density
    rank = compression["summary"][f"lowrank/{density}"]["rank"]
    top, low = [], []
    for tv in suite.tvs.values():
        total = sum(float(t.double().pow(2).sum()) for t in tv.deltas.values())
        top.append(sum(float(sparsify.magnitude(t, density).double().pow(2).sum()) for t in tv.deltas.values()) / total)
        low.append(sum(float(torch.linalg.svdvals(t.double())[:rank].pow(2).sum())
                       for t in tv.deltas.values() if t.dim() == 2) / total)
    searches = [c["search"] for d in budget.densities for c in compression["cells"][f"nps/{d}"].values()]
    return {
        f"tau_energy_share_top_{density}_per_tensor": _mean(top),
        f"tau_energy_share_top_{rank}_singular_directions": _mean(low),
        "nps_searches": len(searches),
        "nps_searches_with_a_weight_within_0.01_of_max_4": sum(max(s["weights"]) >= 3.99 for s in searches),
        "nps_mean_evaluations": _mean(s["evaluations"] for s in searches),
        "nps_mean_search_seconds": _mean(s["search_seconds"] for s in searches),
    }


# ------------------------------------------------------------------ driver


def run_suite(suite: Suite, budget: Budget, out: Path, record: Mapping | None = None, log=print,
              dare_seeds: Sequence[int] = ()) -> dict:
    """Every table of one suite; writes <suite>.json, <suite>.md and the PNGs under ``out``.
    ``record``: the run's provenance (default: ``provenance()`` now)."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    cache = CellCache(out / f"cells-{suite.name}.jsonl", budget.key())
    with tempfile.TemporaryDirectory(prefix="quality-") as scratch:
        workdir = Path(scratch)
        compression = run_compression(suite, budget, cache, workdir, log, dare_seeds)
        experts = {m: sparse_experts(suite, compression, m, budget.interp_density, budget, workdir)
                   for m in ("magnitude", "nps")}
        dense = {t: tv.deltas for t, tv in suite.tvs.items()}
        interpolation = run_interpolation(suite, budget, cache, {"dense": dense, **experts}, log)
        merging = run_merging(suite, budget, cache, experts, log)
    base_test = cache.get("base/test", lambda: {"accuracy": suite.score({}, suite.tasks, "test")})["accuracy"]
    results = {
        "suite": suite.name, "tasks": suite.tasks, **(record or provenance()),
        "budget": asdict(budget), "budget_key": budget.key(), "calib_examples": suite.calib_sizes,
        "wall_seconds": time.perf_counter() - started,
        "cell_seconds": sum(v.get("seconds", 0.0) for v in cache.cells.values()),
        "torch_threads": torch.get_num_threads(),
        "compression": compression, "interpolation": interpolation, "merging": merging, "base_test": base_test,
    }
    results["diagnostics"] = diagnostics(suite, compression, budget)
    results["acceptance"] = report.acceptance(results)
    (out / f"{suite.name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{suite.name}.md").write_text(report.markdown(results))
    report.plot(results, out)
    log(f"{suite.name}: acceptance {json.dumps(results['acceptance'])}")
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("llm", "vision", "all"), default="all")
    p.add_argument("--zoo", type=Path, default=Path(".cache/zoo/demo"))
    p.add_argument("--out", type=Path, default=Path("results/quality/toy"))
    p.add_argument("--tasks", nargs="*", help="LLM tasks (default: the zoo's)")
    p.add_argument("--calib-n", type=int, default=Budget.calib_n, help="LLM calib examples per task")
    p.add_argument("--test-n", type=int, default=Budget.test_n, help="LLM test examples per task")
    p.add_argument("--generations", type=int, default=Budget.generations, help="LLM CMA-ES generations")
    p.add_argument("--population", type=int, default=None, help="LLM CMA-ES population (default pycma's)")
    p.add_argument("--vision-generations", type=int, default=100)
    p.add_argument("--vision-population", type=int, default=16)
    p.add_argument("--densities", type=float, nargs="*", default=list(DENSITIES))
    p.add_argument("--dare-seeds", type=int, nargs="*", default=[0, 1, 2],
                   help="DARE seeds for its spread row (the main row uses seed 0)")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    record = provenance(argv=argv)  # at the start: HEAD may move during a long run
    densities = tuple(args.densities)
    if args.suite in ("llm", "all"):
        budget = Budget(calib_n=args.calib_n, test_n=args.test_n, generations=args.generations,
                        population=args.population, densities=densities)
        suite = llm_suite(args.zoo, args.tasks or list(zoo_spec(args.zoo).tasks), budget)
        run_suite(suite, budget, args.out, record, common.log, args.dare_seeds)
    if args.suite in ("vision", "all"):
        budget = Budget(calib_n=0, test_n=0, generations=args.vision_generations,
                        population=args.vision_population, densities=densities)
        run_suite(vision_suite(args.zoo), budget, args.out, record, common.log, args.dare_seeds)


if __name__ == "__main__":
    main()
