"""``deltaserve`` command line: one subcommand per job, heavy imports deferred."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experts.zoo.spec import PRESETS

DEFAULT_ZOO_ROOT = Path(".cache/zoo")


def _cmd_zoo_build(args: argparse.Namespace) -> int:
    from experts.zoo.build import ZooBuilder
    from experts.zoo.spec import preset

    spec = preset(args.size)
    out = args.out or DEFAULT_ZOO_ROOT / args.size
    builder = ZooBuilder(spec, out)
    matrices = builder.build(workers=args.workers)
    for matrix in matrices:
        matrix.print(title=f"{spec.size} zoo — {matrix.suite} suite, test split accuracy")
    print(f"zoo ready in {out} (matrix: {builder.layout.matrix})")
    return 0


def _require_dir(path: Path, marker: str, what: str) -> Path:
    """Exit with a clear message unless ``path`` is a directory holding ``marker``."""
    if not path.is_dir():
        raise SystemExit(f"error: {what} {path} is not a directory")
    if not (path / marker).is_file():
        raise SystemExit(f"error: {what} {path} has no {marker}")
    return path


def _cmd_eval(args: argparse.Namespace) -> int:
    from peft import PeftModel

    from experts.zoo.build import load_llama, load_tokenizer
    from experts.zoo.evaluate import TaskEvaluator
    from experts.zoo.matrix import AccuracyMatrix
    from experts.zoo.tasks import TASKS

    tasks = args.tasks or sorted(TASKS)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"error: unknown task(s) {unknown}; known tasks: {sorted(TASKS)}")
    if args.n < 1:
        raise SystemExit(f"error: --n must be >= 1, got {args.n}")
    _require_dir(args.model, "config.json", "--model")
    if args.adapter:
        _require_dir(args.adapter, "adapter_config.json", "--adapter")
    model = load_llama(args.model)
    label = str(args.model)
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter)
        label = f"{args.model} + {args.adapter}"
    evaluator = TaskEvaluator(load_tokenizer(args.model), tasks, args.split, args.n, args.seed)
    scores = evaluator.score(model)
    matrix = AccuracyMatrix("eval", tasks, {label: scores})
    matrix.print(title=f"{args.split} split, {args.n} examples per task, exact match")
    result = {"model": str(args.model), "adapter": str(args.adapter) if args.adapter else None,
              "split": args.split, "n": args.n, "seed": args.seed, "accuracy": scores}
    if args.json:
        from experts.atomic import write_json_atomic

        write_json_atomic(args.json, result)
    else:
        json.dump(result, sys.stdout, indent=2)
        print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltaserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    zoo = sub.add_parser("zoo", help="build the synthetic model zoo")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zoo_sub.add_parser("build", help="build (or reuse cached) base, experts, vision suite and matrix")
    build.add_argument("--size", choices=sorted(PRESETS), default="demo")
    build.add_argument("--out", type=Path, help=f"output directory (default {DEFAULT_ZOO_ROOT}/SIZE)")
    build.add_argument("--workers", type=int, default=2,
                       help="processes training experts in parallel (each single-threaded)")
    build.set_defaults(func=_cmd_zoo_build)

    ev = sub.add_parser("eval", help="exact-match accuracy of a model (optionally + PEFT adapter) on zoo tasks")
    ev.add_argument("--model", type=Path, required=True, help="HF causal LM directory")
    ev.add_argument("--adapter", type=Path, help="PEFT adapter directory applied on top of --model")
    ev.add_argument("--tasks", nargs="+", help="task names (default: all)")
    ev.add_argument("--split", choices=["train", "calib", "test"], default="test")
    ev.add_argument("--n", type=int, default=200, help="examples per task")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--json", type=Path, help="write the result here instead of stdout")
    ev.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
