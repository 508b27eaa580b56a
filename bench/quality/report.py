"""Markdown tables, PNG plots and acceptance checks for bench.quality.tables results.

Pure functions of the results dict that ``bench.quality.tables.run_suite`` builds;
no model code here.
"""

from __future__ import annotations

from pathlib import Path

METHOD_LABELS = {"magnitude": "magnitude", "dare": "DARE", "tswitch": "T-Switch (ternary)",
                 "lowrank": "low-rank (SVD)", "nps": "NPS"}
MERGE_LABELS = {"task_arithmetic": "task arithmetic", "ties": "TIES", "dare_ties": "DARE-TIES", "pcb": "PCB",
                "magnitude_ta": "magnitude r=0.05 + TA", "nps_ta": "NPS r=0.05 + TA (eq. 7)"}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def compression_table(results: dict) -> str:
    comp, densities = results["compression"], results["budget"]["densities"]
    lines = ["| method | " + " | ".join(f"r = {d}" for d in densities) + " |",
             "|---|" + "---:|" * len(densities)]
    for method, label in METHOD_LABELS.items():
        cells = []
        for d in densities:
            s = comp["summary"][f"{method}/{d}"]
            rank = f", rank {s['rank']}" if method == "lowrank" else ""
            cells.append(f"{s['retained_pct']:.1f} % ({s['bits_per_param']:.2f} b{rank})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    spread = comp.get("dare_seeds") or {}
    if spread:
        seeds = next(iter(spread.values()))["seeds"]
        lines.append(f"| DARE, seeds {', '.join(map(str, seeds))}: min–max | " + " | ".join(
            f"{spread[str(d)]['min']:.1f}–{spread[str(d)]['max']:.1f} %" if str(d) in spread else "–"
            for d in densities) + " |")
    own = comp["own_accuracy"]
    note = ("\nCells: mean over tasks of accuracy retained (compressed test accuracy / the fine-tuned "
            "expert's own test accuracy), and in brackets bits per base parameter from the stored "
            "experts' exact bytes. Fine-tuned own accuracy: "
            + ", ".join(f"{t} {_pct(a)} %" for t, a in own.items()) + ".\n")
    return "\n".join(lines) + "\n" + note


def per_task_table(results: dict, density: float) -> str:
    comp, tasks = results["compression"], results["tasks"]
    lines = ["| method | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
    lines.append("| fine-tuned | " + " | ".join(_pct(comp["own_accuracy"][t]) for t in tasks)
                 + f" | {_pct(sum(comp['own_accuracy'].values()) / len(tasks))} |")
    for method, label in METHOD_LABELS.items():
        s = comp["summary"][f"{method}/{density}"]
        accs = [s["per_task_accuracy"][t] for t in tasks]
        lines.append(f"| {label} | " + " | ".join(_pct(a) for a in accs) + f" | {_pct(sum(accs) / len(accs))} |")
    return "\n".join(lines) + "\n"


def interpolation_table(results: dict) -> str:
    rows, lambdas = results["interpolation"], results["budget"]["interp_lambdas"]
    methods = sorted({r["method"] for r in rows.values()}, key=["dense", "magnitude", "nps"].index)
    head = "| lambda | " + " | ".join(f"{m} own | {m} others" for m in methods) + " |"
    lines = [head, "|---|" + "---:|" * (2 * len(methods))]
    for lam in lambdas:
        cells = [f"{_pct(rows[f'{m}/{lam}']['own'])} | {_pct(rows[f'{m}/{lam}']['others'])}" for m in methods]
        lines.append(f"| {lam} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def merge_table(results: dict) -> str:
    tasks, merging = results["tasks"], results["merging"]
    lines = ["| method | chosen on calib | " + " | ".join(tasks) + " | avg test | avg calib |",
             "|---|---|" + "---:|" * (len(tasks) + 2)]
    base = results["base_test"]
    own = results["compression"]["own_accuracy"]
    for name, accuracy in (("base", base), ("individual fine-tuned", own)):
        cells = " | ".join(_pct(accuracy[t]) for t in tasks)
        lines.append(f"| {name} | – | {cells} | {_pct(_avg(accuracy))} | – |")
    for label, name in MERGE_LABELS.items():
        c = merging[label]
        chosen = ", ".join([f"{k} {v}" for k, v in c["options"].items()] + [f"λ {c['lambda']}"])
        lines.append(f"| {name} | {chosen} | " + " | ".join(_pct(c["test"][t]) for t in tasks)
                     + f" | **{_pct(c['test_mean'])}** | {_pct(c['calib_mean'])} |")
    return "\n".join(lines) + "\n"


def _avg(d: dict) -> float:
    return sum(d.values()) / len(d)


def acceptance(results: dict) -> dict:
    """The issue's acceptance criteria, measured (never tuned on)."""
    s = results["compression"]["summary"]
    low = [d for d in results["budget"]["densities"] if d <= 0.05]
    m = results["merging"]
    spread = results["compression"].get("dare_seeds") or {}

    def dare(d: float) -> float:  # the best DARE seed, when several were run
        return spread[str(d)]["max"] if str(d) in spread else s[f"dare/{d}"]["retained_pct"]

    return {
        "nps_r0.05_retained_pct": s["nps/0.05"]["retained_pct"] if "nps/0.05" in s else None,
        "nps_r0.05_retains_99pct": "nps/0.05" in s and s["nps/0.05"]["retained_pct"] >= 99.0,
        "nps_vs_magnitude_dare_at_low_density": {
            str(d): {"magnitude": round(s[f"nps/{d}"]["retained_pct"] - s[f"magnitude/{d}"]["retained_pct"], 2),
                     "dare_best_seed": round(s[f"nps/{d}"]["retained_pct"] - dare(d), 2)} for d in low},
        "nps_at_least_magnitude_and_dare_at_low_density": all(
            s[f"nps/{d}"]["retained_pct"] >= max(s[f"magnitude/{d}"]["retained_pct"], dare(d)) for d in low),
        "merge_test_mean": {k: v["test_mean"] for k, v in m.items()},
        "nps_merge_beats_task_arithmetic": m["nps_ta"]["test_mean"] > m["task_arithmetic"]["test_mean"],
        "nps_merge_minus_ties": m["nps_ta"]["test_mean"] - m["ties"]["test_mean"],
        "nps_merge_minus_pcb": m["nps_ta"]["test_mean"] - m["pcb"]["test_mean"],
    }


def markdown(results: dict) -> str:
    b = results["budget"]
    parts = [f"## {results['suite']} suite\n",
             f"Command: `{results['command']}`  \ncommit {results['git_commit']}, "
             f"wall {results['wall_seconds']:.0f} s this run (cells found in the cache cost nothing), "
             f"{results['cell_seconds']:.0f} s of compute summed over all cells "
             f"({results['torch_threads']} torch thread).\n",
             f"### Compression (accuracy retained vs bits/param)\n\n{compression_table(results)}",
             f"Per-task test accuracy (%) at r = {b['interp_density']}:\n\n"
             f"{per_task_table(results, b['interp_density'])}",
             f"### Interpolation θ_base + λ·τ̂ (r = {b['interp_density']}; test accuracy %, mean over tasks)\n\n"
             f"'own': the expert's task; 'others': mean over the other tasks.\n\n{interpolation_table(results)}",
             f"### Merging all {len(results['tasks'])} tasks (test accuracy %)\n\n{merge_table(results)}",
             "### Diagnostics\n\n" + "\n".join(f"- {k}: {v:.3g}" for k, v in results["diagnostics"].items()) + "\n"]
    return "\n".join(parts)


def plot(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suite, s = results["suite"], results["compression"]["summary"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, label in METHOD_LABELS.items():
        pts = sorted((s[f"{method}/{d}"]["bits_per_param"], s[f"{method}/{d}"]["retained_pct"])
                     for d in results["budget"]["densities"])
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.set(xlabel="bits per base parameter (stored bytes)", ylabel="accuracy retained (%)",
           title=f"{suite}: compression (r = {', '.join(map(str, results['budget']['densities']))})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out / f"{suite}_compression.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    rows = results["interpolation"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), sharex=True)
    for method in sorted({r["method"] for r in rows.values()}):
        pts = sorted((r["lambda"], r["own"], r["others"]) for r in rows.values() if r["method"] == method)
        lams, own, others = zip(*pts)
        axes[0].plot(lams, [100 * x for x in own], marker="o", label=method)
        axes[1].plot(lams, [100 * x for x in others], marker="o", label=method)
    axes[0].set(xlabel="λ", ylabel="own-task test accuracy (%)", title=f"{suite}: own task")
    axes[1].set(xlabel="λ", ylabel="mean other-task accuracy (%)", title=f"{suite}: other tasks")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    paths.append(out / f"{suite}_interpolation.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
