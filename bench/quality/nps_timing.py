"""How long one NPS search takes on the real base, at the default budget, through the product's path.

    .venv/bin/python -m bench.quality.nps_timing --skills iso_date    # -> results/quality/real/nps_timing.json

For each skill: the full fine-tune's task vector compressed by `compress --method nps` at r = 0.05 with
every search option at its default (experts.compress.NpsOptions: 8 bands, up to 20 CMA-ES generations of
pycma's population, max weight 4), the objective the product builds from a calibration file
(experts.calibration.delta_objective: teacher-forced graded exact match, here the skill's 64 calibration
prompts, as `deltaserve zoo data --split calib --n 64` writes them). Reported: the wall time of the whole
compression (loading the base and the fine-tune, the search, writing the expert), the search's own
seconds, candidates scored, seconds per candidate, why it stopped, and whether it found the same band
weights as the compression table's cell for the same skill and density (results/quality/real/cells.jsonl,
searched by ``bench.quality.real_compression``). Run it with nothing else on the machine: it is a
timing.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import REPO, built_real_suite, log, provenance

OUT = REPO / "results" / "quality" / "real"
DENSITY = 0.05
CALIB = 64
TARGET_S = 600.0


def previous_weights(skill: str, cells: Path) -> list[float] | None:
    if not cells.exists():
        return None
    for line in cells.read_text().splitlines():
        cell = json.loads(line)
        if cell["skill"] == skill and cell["method"] == "nps" and cell["options"].get("density") == DENSITY:
            return cell["nps"]["weights"]
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skills", nargs="+", default=["iso_date"])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    record = provenance(argv=argv)
    from deltaserve.experts.calibration import delta_objective
    from deltaserve.experts.compress import compress_expert, extract
    from deltaserve_zoo.real.skills import get_skill

    builder = built_real_suite()
    rows = []
    for skill in args.skills:
        started = time.perf_counter()
        objective = delta_objective(builder.layout.base, get_skill(skill).examples("calib", CALIB))
        tau = extract(builder.layout.base, builder.layout.full(skill))
        with tempfile.TemporaryDirectory() as tmp:
            manifest = compress_expert(tau, Path(tmp) / "e", name="e", method="nps", density=DENSITY,
                                       objective=objective, progress=False)
        wall = time.perf_counter() - started
        search = manifest.method
        before = previous_weights(skill, args.out / "cells.jsonl")
        row = {"skill": skill, "density": DENSITY, "calibration_prompts": CALIB, "wall_s": round(wall, 1),
               "search_s": search["search_seconds"], "evaluations": search["evaluations"],
               "s_per_candidate": round(search["search_seconds"] / search["evaluations"], 3),
               "generations": len(search["history"]), "stop_reason": search["stop_reason"],
               "calibration_score": manifest.calibration_score, "history": search["history"],
               "weights": search["weights"], "within_target": wall <= TARGET_S,
               "same_weights_as_table_cell": None if before is None else before == search["weights"],
               **{k: record[k] for k in ("command", "git_commit", "date")}}
        rows.append(row)
        log(f"{skill}: {wall:.0f} s wall ({row['search_s']:.0f} s search, {row['evaluations']} candidates, "
            f"{row['s_per_candidate']:.2f} s each, {row['generations']} generations: {row['stop_reason']}); "
            f"same weights as the table's cell: {row['same_weights_as_table_cell']}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "nps_timing.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    kept = [r for r in old if r["skill"] not in args.skills]
    path.write_text(json.dumps({**record, "target_s": TARGET_S, "rows": kept + rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
