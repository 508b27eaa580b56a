"""What one registration costs the router in a large store: the knn router's refit after one expert is added.

Builds ``--experts`` synthetic experts with two distinct exemplar prompts each (more texts than the encoder's
4,096-text LRU holds from 2,049 experts on), fits the knn router on MiniLM features, then refits it with one
expert more: incrementally (experts whose exemplars did not change keep their features; what
``RoutingService.set_exemplars`` does on every registration) and from scratch on a new router sharing the same
warm encoder (every expert's texts through the encoder's cache again). Side by side in one run.

    .venv/bin/python -m bench.routing.refit --out results/routing/refit.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import provenance


def exemplars(n: int) -> dict[str, list[str]]:
    return {f"e{i}": [f"Please convert item number {i} into the format of skill {i % 50}.",
                      f"Expert {i}: answer question {i * 7} about topic {i % 13}."] for i in range(n)}


def measure(n: int, encoder) -> dict:
    from deltaserve.router import make_router

    before = exemplars(n)
    after = {**before, "new": ["A brand new skill prompt.", "Another exemplar for it."]}
    router = make_router("knn", encoder=encoder)
    started = time.perf_counter()
    router.fit(before)
    first = time.perf_counter() - started
    started = time.perf_counter()
    router.fit(after)
    incremental = time.perf_counter() - started
    scratch_router = make_router("knn", encoder=encoder)
    started = time.perf_counter()
    scratch_router.fit(after)
    scratch = time.perf_counter() - started
    return {"experts": n, "exemplars": 2 * n, "first_fit_s": round(first, 3),
            "refit_incremental_s": round(incremental, 4), "refit_from_scratch_s": round(scratch, 3),
            "ratio": round(scratch / incremental, 1)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, nargs="+", default=[1000, 3000])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    from deltaserve.router.features import make_encoder

    rows = []
    for n in args.experts:
        rows.append(measure(n, make_encoder("minilm")))   # a fresh encoder (cold cache) per size
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'experts':>7} {'first fit s':>11} {'refit s':>8} {'from scratch s':>14} {'ratio':>6}")
    for r in rows:
        print(f"{r['experts']:>7} {r['first_fit_s']:>11.2f} {r['refit_incremental_s']:>8.3f} "
              f"{r['refit_from_scratch_s']:>14.2f} {r['ratio']:>6.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**provenance(argv=argv), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
