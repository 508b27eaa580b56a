"""``deltaserve zoo build|data``: build the zoo (toy sizes or the real suite), export its task data.

The zoo (package ``deltaserve_zoo``) provides models and tasks for the demo, the
benchmarks and the tests; only the zoo/eval/demo commands import it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from deltaserve.server.commands._shared import DEFAULT_ZOO_ROOT

HELP = "build the model zoo, export its task data"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="zoo_command", required=True)
    build = sub.add_parser("build", help="build (or reuse cached) base, experts, vision suite and matrix")
    build.add_argument("--size", default="demo", help="real (SmolLM2-135M-Instruct suite), or a toy size: micro, demo")
    build.add_argument("--out", type=Path, help=f"output directory (default {DEFAULT_ZOO_ROOT}/SIZE)")
    build.add_argument("--workers", type=int, default=2,
                       help="processes training experts in parallel (each single-threaded)")
    build.set_defaults(func=zoo_build)
    data = sub.add_parser("data", help="write a zoo task's examples as chat-example JSONL")
    data.add_argument("--task", required=True)
    data.add_argument("--split", choices=["train", "calib", "test"], default="calib")
    data.add_argument("--n", type=int, default=64, help="examples")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    data.set_defaults(func=zoo_data)


def run(args: argparse.Namespace) -> int:
    return args.func(args)


def zoo_build(args: argparse.Namespace) -> int:
    from deltaserve_zoo.build import ZooBuilder
    from deltaserve_zoo.spec import preset

    if args.size == "real":
        return _real_build(args)
    try:
        spec = preset(args.size)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    out = args.out or DEFAULT_ZOO_ROOT / args.size
    builder = ZooBuilder(spec, out)
    matrices = builder.build(workers=args.workers)
    for matrix in matrices:
        matrix.print(title=f"{spec.size} zoo — {matrix.suite} suite, test split accuracy")
        print("  " + ", ".join(f"{k} {v:.1%}" for k, v in matrix.summary().items()))
    print(f"zoo ready in {out} (matrix: {builder.layout.matrix})")
    return 0


def _real_build(args: argparse.Namespace) -> int:
    from deltaserve_zoo.real.build import RealSuiteBuilder

    out = args.out or DEFAULT_ZOO_ROOT / "real"
    builder = RealSuiteBuilder(out)
    for matrix in builder.build(workers=args.workers):
        matrix.print(title="real suite — test split accuracy through vLLM")
        print("  " + ", ".join(f"{k} {v:.1%}" for k, v in matrix.summary().items()))
    print(f"real suite ready in {out} (matrix: {builder.layout.matrix})")
    return 0


def zoo_data(args: argparse.Namespace) -> int:
    """A zoo task's or real-suite skill's examples as chat-example JSONL (what `compress
    --calibration/--training` reads)."""
    from deltaserve.experts.examples import write_examples
    from deltaserve_zoo.real.skills import all_skills, get_skill
    from deltaserve_zoo.tasks import TASKS

    if args.n < 1:
        raise SystemExit(f"error: --n must be >= 1, got {args.n}")
    if args.task in all_skills():
        examples = get_skill(args.task).examples(args.split, args.n, args.seed)
    elif args.task in TASKS:
        from deltaserve.experts.examples import ChatExample

        examples = [ChatExample.of(e.question, e.answer) for e in TASKS[args.task].examples(args.split, args.n,
                                                                                             args.seed)]
    else:
        raise SystemExit(f"error: unknown task {args.task!r}; real-suite skills: {all_skills()}; "
                         f"toy tasks: {sorted(TASKS)}")
    write_examples(args.out, examples)
    print(f"wrote {len(examples)} {args.split} examples of {args.task} to {args.out}")
    return 0
