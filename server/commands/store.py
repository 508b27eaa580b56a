"""``deltaserve store add|list|rm``: manage an expert store without a server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deltaserve.server.commands._options import add_option_flags, options_from_args
from deltaserve.server.commands._shared import (add_examples_arguments, compression_helpers, parse_options,
                                                print_manifest, require_dir)

HELP = "manage an expert store without a server"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from deltaserve.experts.compress import COMPRESSORS

    sub = p.add_subparsers(dest="store_command", required=True)
    add = sub.add_parser("add", help="register an expert folder, PEFT adapter or HF fine-tune")
    rm = sub.add_parser("rm", help="delete an expert")
    ls = sub.add_parser("list", help="list experts")
    for q in (add, rm, ls):
        q.add_argument("--store", type=Path, required=True)
        q.add_argument("--base", type=Path, required=True)
    add.add_argument("--name", required=True)
    add.add_argument("--source", type=Path, required=True)
    add.add_argument("--method", choices=sorted(COMPRESSORS), help="compress with this method "
                     "(default: expert folders as is, LoRAs exact, full fine-tunes magnitude 0.05)")
    add_examples_arguments(add)
    add.add_argument("--exemplars", type=Path, help="JSON list of example prompts for the routers")
    add.add_argument("--replace", action="store_true")
    add_option_flags(add, COMPRESSORS, "compression options")
    add.set_defaults(func=_add)
    rm.add_argument("name")
    rm.set_defaults(func=_rm)
    ls.set_defaults(func=_list)


def run(args: argparse.Namespace) -> int:
    return args.func(args)


def _store(args: argparse.Namespace):
    from deltaserve.experts.store import ExpertStore

    require_dir(args.base, "config.json", "--base")
    return ExpertStore(args.store, args.base)


def _add(args: argparse.Namespace) -> int:
    from deltaserve.experts.compress import COMPRESSORS
    from deltaserve.experts.sources import Compression
    from deltaserve.experts.store_errors import StoreError

    store = _store(args)
    compression, options = None, {}
    if args.method:
        options = options_from_args(args, COMPRESSORS, args.method)
        parse_options(COMPRESSORS, args.method, options)
        compression = Compression(method=args.method, task=args.task, **options)
    objective, trainer = compression_helpers(args.method, args.base, args, options)
    exemplars = json.loads(args.exemplars.read_text()) if args.exemplars else None
    try:
        manifest = store.import_source(args.name, args.source, compression=compression, exemplars=exemplars,
                                       replace=args.replace, objective=objective, trainer=trainer)
    except (StoreError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print_manifest(manifest, store.path(args.name))
    print(f"store generation {store.generation()}")
    return 0


def _list(args: argparse.Namespace) -> int:
    store = _store(args)
    for name in store.names():
        m = store.load(name).manifest
        print(f"{name:24s} {m.kind:5s} {m.codec:8s} {m.bits_per_param:7.3f} bits/param  {m.bytes:>10d} B  "
              f"exemplars={len(store.exemplars(name))}")
    print(f"generation {store.generation()}, {len(store.names())} experts")
    return 0


def _rm(args: argparse.Namespace) -> int:
    from deltaserve.experts.store_errors import StoreError

    try:
        _store(args).delete(args.name)
    except StoreError as err:
        raise SystemExit(f"error: {err}") from None
    return 0
