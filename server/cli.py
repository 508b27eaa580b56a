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
        print("  " + ", ".join(f"{k} {v:.1%}" for k, v in matrix.summary().items()))
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


def _cmd_compress(args: argparse.Namespace) -> int:
    from experts.compress import compress_expert, extract

    _require_dir(args.base, "config.json", "--base")
    if args.finetuned:
        _require_dir(args.finetuned, "config.json", "--finetuned")
    if args.adapter:
        _require_dir(args.adapter, "adapter_config.json", "--adapter")
    if not 0 < args.density <= 1:
        raise SystemExit(f"error: --density must be in (0, 1], got {args.density}")
    objective = None
    if args.method == "nps":
        if not args.task:
            raise SystemExit("error: --method nps needs --task (its calibration objective is that task's accuracy)")
        objective = _zoo_objective(args.base, args.task, args.calib_n)
    trainer = _zoo_trainer(args) if args.method == "sparse_ft" else None
    tv = extract(args.base, args.finetuned, args.adapter)
    name = args.name or args.out.name
    try:
        manifest = compress_expert(
            tv, args.out, name=name, method=args.method, density=args.density, rank=args.rank, seed=args.seed,
            objective=objective, task=args.task, generations=args.generations, bands=args.bands,
            population=args.population, per_tensor=args.banding == "per-tensor", max_weight=args.max_weight,
            trainer=trainer,
        )
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    _print_manifest(manifest, args.out)
    return 0


def _zoo_objective(base: Path, task: str, n: int):
    from experts.zoo.build import load_llama, load_tokenizer
    from experts.zoo.evaluate import TaskEvaluator, task_vector_objective
    from experts.zoo.tasks import TASKS

    if task not in TASKS:
        raise SystemExit(f"error: unknown task {task!r}; known tasks: {sorted(TASKS)}")
    evaluator = TaskEvaluator(load_tokenizer(base), [task], "calib", n)
    return task_vector_objective(load_llama(base), evaluator, task)


def _zoo_trainer(args: argparse.Namespace):
    from experts.zoo.build import masked_trainer
    from experts.zoo.spec import FinetuneSpec
    from experts.zoo.tasks import TASKS

    if not args.task:
        raise SystemExit("error: --method sparse_ft needs --task (it re-trains on that task's train split)")
    if args.task not in TASKS:
        raise SystemExit(f"error: unknown task {args.task!r}; known tasks: {sorted(TASKS)}")
    try:
        spec = FinetuneSpec(steps=args.train_steps, batch_size=args.train_batch_size, lr=args.train_lr,
                            train_examples=args.train_examples)
    except ValueError as err:
        raise SystemExit(f"error: bad training options: {err}") from None
    return masked_trainer(args.base, args.task, spec, args.seed)


def _print_manifest(manifest, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"expert {manifest.name} ({path})", show_header=False)
    rows = [("kind", manifest.kind), ("task", manifest.task or "-"), ("codec", manifest.codec),
            ("density", "-" if manifest.density is None else f"{manifest.density:.4f}"),
            ("rank", "-" if manifest.rank is None else str(manifest.rank)),
            ("bytes", f"{manifest.bytes:,}"), ("bits/param", f"{manifest.bits_per_param:.3f}"),
            ("base params", f"{manifest.base_params:,}"), ("carried", ", ".join(manifest.carried) or "-"),
            ("method", json.dumps({k: v for k, v in manifest.method.items() if k != "history"})),
            ("calibration score", "-" if manifest.calibration_score is None else f"{manifest.calibration_score:.3f}"),
            ("source", manifest.source), ("base fingerprint", manifest.base_fingerprint), ("created", manifest.created)]
    for key, value in rows:
        table.add_row(key, value)
    Console().print(table)


def _cmd_merge(args: argparse.Namespace) -> int:
    from experts.expert import ExpertFormatError
    from experts.merge_model import MergeError, merge_into_checkpoint

    _require_dir(args.base, "config.json", "--base")
    if args.weights and len(args.weights) != len(args.experts):
        raise SystemExit(f"error: {len(args.weights)} --weights for {len(args.experts)} --experts")
    options = {"density": args.density} if args.density is not None else {}
    try:
        merge_into_checkpoint(args.base, args.experts, args.out, method=args.method, weights=args.weights,
                              scale=args.scale, **options)
    except (MergeError, ExpertFormatError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"merged {len(args.experts)} experts with {args.method} into {args.out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from experts.expert import ExpertFormatError, load_expert

    try:
        expert = load_expert(args.expert, verify=args.verify)
    except ExpertFormatError as err:
        raise SystemExit(f"error: {err}") from None
    _print_manifest(expert.manifest, args.expert)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from server.serve import serve

    return serve(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from server.serve import demo

    return demo(args)


def _store(args: argparse.Namespace):
    from experts.store import ExpertStore

    _require_dir(args.base, "config.json", "--base")
    return ExpertStore(args.store, args.base)


def _cmd_store_add(args: argparse.Namespace) -> int:
    from experts.store import Compression, StoreError

    store = _store(args)
    compression = None
    if args.method:
        compression = Compression(method=args.method, density=args.density, rank=args.rank, task=args.task)
    exemplars = None
    if args.exemplars:
        exemplars = json.loads(args.exemplars.read_text())
    objective = _zoo_objective(args.base, args.task, args.calib_n) if args.method == "nps" else None
    try:
        manifest = store.import_source(args.name, args.source, compression=compression, exemplars=exemplars,
                                       replace=args.replace, objective=objective)
    except (StoreError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    _print_manifest(manifest, store.path(args.name))
    print(f"store generation {store.generation()}")
    return 0


def _cmd_store_list(args: argparse.Namespace) -> int:
    store = _store(args)
    for name in store.names():
        m = store.load(name).manifest
        print(f"{name:24s} {m.kind:5s} {m.codec:8s} {m.bits_per_param:7.3f} bits/param  {m.bytes:>10d} B  "
              f"exemplars={len(store.exemplars(name))}")
    print(f"generation {store.generation()}, {len(store.names())} experts")
    return 0


def _cmd_store_rm(args: argparse.Namespace) -> int:
    from experts.store import StoreError

    try:
        _store(args).delete(args.name)
    except StoreError as err:
        raise SystemExit(f"error: {err}") from None
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

    from experts.compress import COMPRESSORS

    comp = sub.add_parser("compress", help="compress a fine-tune or LoRA into an expert directory")
    comp.add_argument("--base", type=Path, required=True, help="base HF model directory")
    source = comp.add_mutually_exclusive_group(required=True)
    source.add_argument("--finetuned", type=Path, help="fully fine-tuned HF model directory")
    source.add_argument("--adapter", type=Path, help="PEFT LoRA adapter directory")
    comp.add_argument("--method", choices=sorted(COMPRESSORS), default="nps")
    comp.add_argument("--density", type=float, default=0.05, help="kept fraction (sparse/ternary methods)")
    comp.add_argument("--rank", type=int, default=8, help="rank (lowrank method)")
    comp.add_argument("--task", help="zoo task whose calib split is NPS's objective")
    comp.add_argument("--calib-n", type=int, default=100, help="calibration examples (nps)")
    comp.add_argument("--generations", type=int, default=20, help="CMA-ES generations (nps)")
    comp.add_argument("--bands", type=int, default=8, help="magnitude bands (nps)")
    comp.add_argument("--population", type=int, help="CMA-ES population (nps; default pycma's 4 + 3 ln(bands))")
    comp.add_argument("--banding", choices=("global", "per-tensor"), default="global",
                      help="rank and prune over all tensors at once or within each tensor (nps)")
    comp.add_argument("--max-weight", type=float, default=4.0, help="upper bound of every band weight (nps)")
    comp.add_argument("--train-steps", type=int, default=400, help="fine-tune steps (sparse_ft)")
    comp.add_argument("--train-lr", type=float, default=1e-3, help="fine-tune lr (sparse_ft)")
    comp.add_argument("--train-batch-size", type=int, default=32, help="fine-tune batch size (sparse_ft)")
    comp.add_argument("--train-examples", type=int, default=8000, help="train-split examples (sparse_ft)")
    comp.add_argument("--seed", type=int, default=0)
    comp.add_argument("--name", help="expert name (default: the --out directory name)")
    comp.add_argument("--out", type=Path, required=True, help="expert directory to write")
    comp.set_defaults(func=_cmd_compress)

    from experts.merge_model import METHOD_ALIASES
    from experts.merging import MERGE_METHODS

    mrg = sub.add_parser("merge", help="merge experts into the base and write a loadable HF checkpoint")
    mrg.add_argument("--base", type=Path, required=True)
    mrg.add_argument("--experts", type=Path, nargs="+", required=True, help="expert directories")
    mrg.add_argument("--method", choices=sorted([*MERGE_METHODS, *METHOD_ALIASES]), default="task_arithmetic")
    mrg.add_argument("--weights", type=float, nargs="+", help="one per expert (default 1.0 each)")
    mrg.add_argument("--scale", type=float, default=1.0, help="lambda: theta = base + lambda * merged")
    mrg.add_argument("--density", type=float, help="kept fraction for ties/dare/breadcrumbs methods")
    mrg.add_argument("--out", type=Path, required=True, help="output HF checkpoint directory")
    mrg.set_defaults(func=_cmd_merge)

    ins = sub.add_parser("inspect", help="show an expert's kind, density, bytes, bits/param and provenance")
    ins.add_argument("expert", type=Path)
    ins.add_argument("--verify", action="store_true", help="also check file digests and decode every tensor")
    ins.set_defaults(func=_cmd_inspect)

    from server.serve import add_serve_arguments

    srv = sub.add_parser("serve", help="serve the base and the store's experts over an OpenAI-compatible API")
    add_serve_arguments(srv)
    srv.set_defaults(func=_cmd_serve)

    dem = sub.add_parser("demo", help="build the demo zoo, publish its experts into a store and serve them")
    add_serve_arguments(dem, demo=True)
    dem.add_argument("--size", choices=sorted(PRESETS), default="demo")
    dem.add_argument("--no-serve", action="store_true", help="prepare the store and exit")
    dem.set_defaults(func=_cmd_demo)

    sto = sub.add_parser("store", help="manage an expert store without a server")
    sto_sub = sto.add_subparsers(dest="store_command", required=True)
    add = sto_sub.add_parser("add", help="register an expert folder, PEFT adapter or HF fine-tune")
    rm = sto_sub.add_parser("rm", help="delete an expert")
    ls = sto_sub.add_parser("list", help="list experts")
    for p in (add, rm, ls):
        p.add_argument("--store", type=Path, required=True)
        p.add_argument("--base", type=Path, required=True)
    add.add_argument("--name", required=True)
    add.add_argument("--source", type=Path, required=True)
    add.add_argument("--method", choices=sorted(COMPRESSORS), help="compress with this method "
                     "(default: expert folders as is, LoRAs exact, full fine-tunes magnitude 0.05)")
    add.add_argument("--density", type=float, default=0.05)
    add.add_argument("--rank", type=int, default=8)
    add.add_argument("--task", help="zoo task (nps objective)")
    add.add_argument("--calib-n", type=int, default=64)
    add.add_argument("--exemplars", type=Path, help="JSON list of example prompts for the routers")
    add.add_argument("--replace", action="store_true")
    add.set_defaults(func=_cmd_store_add)
    rm.add_argument("name")
    rm.set_defaults(func=_cmd_store_rm)
    ls.set_defaults(func=_cmd_store_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
