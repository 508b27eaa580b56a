"""The CLI commands that use the model zoo (``zoo``, ``eval``, the toy ``demo``); with server.demo, the only
product code that imports it.

The zoo (top-level package ``zoo``) provides models and tasks for the demo,
the benchmarks and the tests; a user serving their own model never goes
through here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_ZOO_ROOT = Path(".cache/zoo")
# On the demo zoo NPS keeps ~60 % of the experts' accuracy at density 0.05 and far more at 0.2
# (results/quality/README.md); the demo serves the denser, still ~3x smaller-than-fp16, experts.
DEMO_NPS_DENSITY = 0.2


def zoo_build(args: argparse.Namespace) -> int:
    from zoo.build import ZooBuilder
    from zoo.spec import preset

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
    from zoo.real.build import RealSuiteBuilder

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
    from experts.examples import write_examples
    from zoo.real.skills import all_skills, get_skill
    from zoo.tasks import TASKS

    if args.n < 1:
        raise SystemExit(f"error: --n must be >= 1, got {args.n}")
    if args.task in all_skills():
        examples = get_skill(args.task).examples(args.split, args.n, args.seed)
    elif args.task in TASKS:
        from experts.examples import ChatExample

        examples = [ChatExample.of(e.question, e.answer) for e in TASKS[args.task].examples(args.split, args.n,
                                                                                             args.seed)]
    else:
        raise SystemExit(f"error: unknown task {args.task!r}; real-suite skills: {all_skills()}; "
                         f"toy tasks: {sorted(TASKS)}")
    write_examples(args.out, examples)
    print(f"wrote {len(examples)} {args.split} examples of {args.task} to {args.out}")
    return 0


def _require_dir(path: Path, marker: str, what: str) -> Path:
    if not path.is_dir():
        raise SystemExit(f"error: {what} {path} is not a directory")
    if not (path / marker).is_file():
        raise SystemExit(f"error: {what} {path} has no {marker}")
    return path


def evaluate(args: argparse.Namespace) -> int:
    from peft import PeftModel

    from experts.hfmodel import load_causal_lm, load_tokenizer
    from zoo.evaluate import TaskEvaluator
    from zoo.matrix import AccuracyMatrix
    from zoo.tasks import TASKS

    tasks = args.tasks or sorted(TASKS)
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise SystemExit(f"error: unknown task(s) {unknown}; known tasks: {sorted(TASKS)}")
    if args.n < 1:
        raise SystemExit(f"error: --n must be >= 1, got {args.n}")
    _require_dir(args.model, "config.json", "--model")
    if args.adapter:
        _require_dir(args.adapter, "adapter_config.json", "--adapter")
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
        from experts.atomic import write_json_atomic

        write_json_atomic(args.json, result)
    else:
        json.dump(result, sys.stdout, indent=2)
        print()
    return 0


# ---------------------------------------------------------------------------- demo


def seed_demo_store(zoo_root: Path, store_dir: Path, *, density: float = DEMO_NPS_DENSITY, nps_generations: int = 6,
                    calib_n: int = 48) -> Path:
    """Publish the zoo's experts: full fine-tunes NPS-compressed, LoRAs kept exact with exemplars."""
    from experts.calibration import delta_objective
    from experts.examples import ChatExample
    from experts.store import Compression, ExpertStore
    from zoo.build import ZooLayout
    from zoo.spec import ZooSpec
    from zoo.tasks import get_task

    spec = ZooSpec.model_validate_json((zoo_root / "spec.json").read_text())
    layout = ZooLayout(zoo_root)
    store = ExpertStore(store_dir, layout.base)
    have = set(store.names())
    for task in spec.tasks:
        name = task.replace("_", "-")
        exemplars = [e.question for e in get_task(task).examples("calib", 64, seed=1)]
        if f"{name}-lora" not in have:
            store.import_source(f"{name}-lora", layout.lora(task), exemplars=exemplars)
            print(f"published {name}-lora (LoRA, exact)", flush=True)
        if name not in have:
            calib = [ChatExample.of(e.question, e.answer) for e in get_task(task).examples("calib", calib_n)]
            store.import_source(name, layout.full(task), objective=delta_objective(layout.base, calib),
                                compression=Compression(method="nps", density=density, task=task,
                                                        generations=nps_generations))
            print(f"published {name} (NPS, density {density})", flush=True)
    return layout.base


def toy_demo(args: argparse.Namespace) -> int:
    """``deltaserve demo --suite toy``: the toy zoo (the tests' fixture) served with its experts."""
    from server.serve import demo_banner, run, settings_from_args
    from zoo.build import ZooBuilder
    from zoo.spec import preset

    zoo_root = DEFAULT_ZOO_ROOT / args.size
    ZooBuilder(preset(args.size), zoo_root).build(workers=2)
    base = seed_demo_store(zoo_root, args.store)
    if args.no_serve:
        return 0
    settings = settings_from_args(args, base)
    banner = demo_banner(args.host, args.port, "auto" if args.router != "none" else "upper", "upper-lora")
    print(f"starting the engine (base {base}, store {args.store}) ...", file=sys.stderr, flush=True)
    return run(settings, args.host, args.port, args.log_level, banner)
