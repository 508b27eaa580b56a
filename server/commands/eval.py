"""``deltaserve eval``: score a zoo model (base, fine-tune or LoRA) on the zoo's tasks with transformers."""

from __future__ import annotations

import argparse
import json
import sys

from pathlib import Path

from deltaserve.server.commands._shared import require_dir

HELP = "exact-match accuracy of a model (optionally + PEFT adapter) on zoo tasks"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True, help="HF causal LM directory")
    p.add_argument("--adapter", type=Path, help="PEFT adapter directory applied on top of --model")
    p.add_argument("--tasks", nargs="+", help="task names (default: all)")
    p.add_argument("--split", choices=["train", "calib", "test"], default="test")
    p.add_argument("--n", type=int, default=200, help="examples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the result here instead of stdout")


def run(args: argparse.Namespace) -> int:
    from peft import PeftModel

    from deltaserve.experts.hfmodel import load_causal_lm, load_tokenizer
    from deltaserve_zoo.evaluate import TaskEvaluator
    from deltaserve_zoo.matrix import AccuracyMatrix
    from deltaserve_zoo.tasks import TASKS

    tasks = args.tasks or sorted(TASKS)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"error: unknown task(s) {unknown}; known tasks: {sorted(TASKS)}")
    if args.n < 1:
        raise SystemExit(f"error: --n must be >= 1, got {args.n}")
    require_dir(args.model, "config.json", "--model")
    if args.adapter:
        require_dir(args.adapter, "adapter_config.json", "--adapter")
    model = load_causal_lm(args.model)
    label = str(args.model)
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter)
        label = f"{args.model} + {args.adapter}"
    evaluator = TaskEvaluator(load_tokenizer(args.model), tasks, args.split, args.n, args.seed)
    scores = evaluator.score(model)
    AccuracyMatrix("eval", tasks, {label: scores}).print(title=f"{args.split} split, {args.n} examples per task, "
                                                              "exact match")
    result = {"model": str(args.model), "adapter": str(args.adapter) if args.adapter else None,
              "split": args.split, "n": args.n, "seed": args.seed, "accuracy": scores}
    if args.json:
        from deltaserve.experts.atomic import write_json_atomic

        write_json_atomic(args.json, result)
    else:
        json.dump(result, sys.stdout, indent=2)
        print()
    return 0
