"""``deltaserve`` command line: one subcommand per job, heavy imports deferred.

Compression and merge options come from the registries (experts.registry):
every option of every method is one flag, checked against the chosen method.
The zoo-using commands live in server.commands (``zoo``, ``eval``, ``demo``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deltaserve.server.cli_options import add_option_flags, options_from_args


def _require_dir(path: Path, marker: str, what: str) -> Path:
    """Exit with a clear message unless ``path`` is a directory holding ``marker``."""
    if not path.is_dir():
        raise SystemExit(f"error: {what} {path} is not a directory")
    if not (path / marker).is_file():
        raise SystemExit(f"error: {what} {path} has no {marker}")
    return path


def _parse_options(registry, name: str, options: dict[str, Any]):
    """Checked options, or exit with the flag and the problem."""
    from deltaserve.experts.registry import OptionsError

    try:
        return registry.parse_options(name, options)
    except OptionsError as err:
        flag = f"--{err.param.replace('_', '-')}: " if err.param else ""
        raise SystemExit(f"error: {flag}{err}") from None


def _helpers(method: str, base: Path, calibration: Path | None, training: Path | None,
             options: dict[str, Any]) -> tuple[Any, Any]:
    """NPS's objective / sparse_ft's trainer from the examples files a method needs."""
    from deltaserve.experts.compress import COMPRESSORS, get_compressor
    from deltaserve.experts.examples import ExampleError, read_examples

    needs = get_compressor(method).needs
    objective = trainer = None
    try:
        if "objective" in needs:
            from deltaserve.experts.calibration import delta_objective

            if calibration is None:
                raise SystemExit(f"error: --method {method} needs --calibration FILE.jsonl (chat examples it is "
                                 "scored on; `deltaserve zoo data` writes them for the zoo's tasks)")
            objective = delta_objective(base, read_examples(calibration))
        if "trainer" in needs:
            from deltaserve.experts.finetune import masked_trainer

            if training is None:
                raise SystemExit(f"error: --method {method} needs --training FILE.jsonl (chat examples it re-trains "
                                 "on; `deltaserve zoo data` writes them for the zoo's tasks)")
            trainer = masked_trainer(base, read_examples(training), COMPRESSORS.parse_options(method, options))
    except (ExampleError, OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    return objective, trainer


def _cmd_compress(args: argparse.Namespace) -> int:
    from deltaserve.experts.compress import COMPRESSORS, compress_expert, extract

    _require_dir(args.base, "config.json", "--base")
    if args.finetuned:
        _require_dir(args.finetuned, "config.json", "--finetuned")
    if args.adapter:
        _require_dir(args.adapter, "adapter_config.json", "--adapter")
    options = options_from_args(args, COMPRESSORS, args.method)
    checked = _parse_options(COMPRESSORS, args.method, options)
    objective, trainer = _helpers(args.method, args.base, args.calibration, args.training, options)
    tv = extract(args.base, args.finetuned, args.adapter)
    try:
        manifest = compress_expert(tv, args.out, name=args.name or args.out.name, method=args.method,
                                   options=checked, objective=objective, trainer=trainer, task=args.task)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    _print_manifest(manifest, args.out)
    return 0


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
    from deltaserve.experts.expert import ExpertFormatError
    from deltaserve.experts.merge.checkpoint import MergeError, merge_into_checkpoint
    from deltaserve.experts.merge.registry import METHOD_ALIASES
    from deltaserve.experts.merge import MERGE_METHODS

    _require_dir(args.base, "config.json", "--base")
    if args.weights and len(args.weights) != len(args.experts):
        raise SystemExit(f"error: {len(args.weights)} --weights for {len(args.experts)} --experts")
    method = METHOD_ALIASES.get(args.method, args.method)
    options = options_from_args(args, MERGE_METHODS, method)
    _parse_options(MERGE_METHODS, method, options)
    try:
        merge_into_checkpoint(args.base, args.experts, args.out, method=method, weights=args.weights,
                              scale=args.scale, **options)
    except (MergeError, ExpertFormatError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"merged {len(args.experts)} experts with {method} into {args.out}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from deltaserve.experts.expert import ExpertFormatError, load_expert

    try:
        expert = load_expert(args.expert, verify=args.verify)
    except ExpertFormatError as err:
        raise SystemExit(f"error: {err}") from None
    _print_manifest(expert.manifest, args.expert)
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from deltaserve.server.methods import families_markdown

    print(families_markdown())
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from deltaserve.server.serve import serve

    return serve(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from deltaserve.server.commands.demo import demo

    return demo(args)


def _zoo_command(module: str, name: str):
    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f"deltaserve.server.commands.{module}"), name)(args)
    return run


def _store(args: argparse.Namespace):
    from deltaserve.experts.store import ExpertStore

    _require_dir(args.base, "config.json", "--base")
    return ExpertStore(args.store, args.base)


def _cmd_store_add(args: argparse.Namespace) -> int:
    from deltaserve.experts.compress import COMPRESSORS
    from deltaserve.experts.sources import Compression
    from deltaserve.experts.store import StoreError

    store = _store(args)
    compression, objective, trainer = None, None, None
    if args.method:
        options = options_from_args(args, COMPRESSORS, args.method)
        _parse_options(COMPRESSORS, args.method, options)
        compression = Compression(method=args.method, task=args.task, **options)
        objective, trainer = _helpers(args.method, args.base, args.calibration, args.training, options)
    exemplars = json.loads(args.exemplars.read_text()) if args.exemplars else None
    try:
        manifest = store.import_source(args.name, args.source, compression=compression, exemplars=exemplars,
                                       replace=args.replace, objective=objective, trainer=trainer)
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
    from deltaserve.experts.store import StoreError

    try:
        _store(args).delete(args.name)
    except StoreError as err:
        raise SystemExit(f"error: {err}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    from deltaserve.server import cli_parsers

    parser = argparse.ArgumentParser(prog="deltaserve", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    handlers = {"zoo_build": _zoo_command("zoo", "zoo_build"), "zoo_data": _zoo_command("zoo", "zoo_data"),
                "eval": _zoo_command("eval", "evaluate"), "demo": _cmd_demo, "compress": _cmd_compress,
                "merge": _cmd_merge, "inspect": _cmd_inspect, "methods": _cmd_methods, "serve": _cmd_serve,
                "store_add": _cmd_store_add, "store_list": _cmd_store_list, "store_rm": _cmd_store_rm}
    cli_parsers.add_all(sub, handlers, add_option_flags)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
