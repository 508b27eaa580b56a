"""lm-eval through deltaserve's HTTP API on the real suite, against the accuracy matrix.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.compat.lmeval_real     # -> results/compat/lmeval_real.json

Serves SmolLM2-135M-Instruct with the real suite's LoRA experts (exact) and
runs lm-eval 0.4.13 ``local-completions`` in its default configuration
(remote tokenizer, token-id prompts; ``echo`` + ``logprobs`` for multiple
choice) on the ``deltaserve_real`` tasks of ``evals/lm_eval`` (written by
``python -m bench.compat.lmeval_tasks --suite real --n 64``: the matrix's
test prompts, budget and scorer). Every generation score is compared with the
matrix cell that scored the same prompts through vLLM directly
(``zoo.real.matrix``).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from bench.common import REPO, log, provenance
from bench.servers import start_server, stop_server

OUT = REPO / "results" / "compat" / "lmeval_real.json"
MODELS = {"base": "base", "iso-date-lora": "lora:iso_date", "sentiment-lora": "lora:sentiment"}


def scores(url: str, model: str, tasks: list[str], concurrency: int) -> dict[str, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(model="local-completions", tasks=tasks,
                                  model_args={"model": model, "base_url": url + "/v1/completions",
                                              "num_concurrent": concurrency},
                                  task_manager=TaskManager(include_path=str(REPO / "evals" / "lm_eval")))
    return {name: next(v for k, v in out["results"][name].items() if k in ("exact_match,none", "acc,none"))
            for name in tasks}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--concurrency", type=int, default=4)
    args = ap.parse_args(argv)
    record = provenance(argv=argv)
    from deltaserve.experts.store import ExpertStore
    from deltaserve_zoo.matrix import AccuracyMatrix
    from deltaserve_zoo.real.build import RealSuiteBuilder

    builder = RealSuiteBuilder(REPO / ".cache" / "zoo" / "real")
    builder.build()
    matrix = AccuracyMatrix.load(builder.layout.matrix / "real.json")
    skills = list(builder.spec.skills)
    tasks = [f"deltaserve_real_{s}" for s in skills] + ["deltaserve_real_mc_sentiment"]
    work = Path(tempfile.mkdtemp(prefix="lmeval-real-"))
    store = ExpertStore(work / "store", builder.layout.base)
    for name, row in MODELS.items():
        if row.startswith("lora:"):
            store.import_source(name, builder.layout.lora(row.removeprefix("lora:")))
    server, url = start_server(builder.layout.base, store.root, work / "server.log", ["--max-model-len", "512"])
    results = {}
    try:
        for model, row in MODELS.items():
            got = scores(url, model, tasks, args.concurrency)
            cells = {f"deltaserve_real_{s}": matrix.rows[row][s] for s in skills}
            results[model] = {"lm_eval": got, "matrix": cells,
                              "equal": all(abs(got[t] - cells[t]) < 1e-9 for t in cells)}
            log(f"{model}: " + ", ".join(f"{t.removeprefix('deltaserve_real_')} "
                                         f"{got[t]:.3f}/{cells.get(t, float('nan')):.3f}" for t in tasks))
    finally:
        stop_server(server)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**record, "models": results}, indent=2) + "\n")
    log(f"lm-eval equals the matrix on every generation task: {all(r['equal'] for r in results.values())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
