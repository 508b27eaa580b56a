"""``deltaserve zoo build|data``: build the zoo (toy sizes or the real suite), export its task data.

The zoo (top-level package ``zoo``) provides models and tasks for the demo, the
benchmarks and the tests; only the zoo/eval/demo commands import it.
"""

from __future__ import annotations

import argparse

from deltaserve.server.cli_parsers import DEFAULT_ZOO_ROOT


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
