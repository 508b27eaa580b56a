"""``deltaserve merge``: merge experts into the base and write a loadable HF checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from deltaserve.server.commands._options import add_option_flags, options_from_args
from deltaserve.server.commands._shared import parse_options, require_dir

HELP = "merge experts into the base and write a loadable HF checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from deltaserve.experts.merge import MERGE_METHODS, METHOD_ALIASES

    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--experts", type=Path, nargs="+", required=True, help="expert directories")
    p.add_argument("--method", choices=sorted([*MERGE_METHODS, *METHOD_ALIASES]), default="task_arithmetic")
    p.add_argument("--weights", type=float, nargs="+", help="one per expert (default 1.0 each)")
    p.add_argument("--scale", type=float, default=1.0, help="lambda: theta = base + lambda * merged")
    p.add_argument("--out", type=Path, required=True, help="output HF checkpoint directory")
    add_option_flags(p, MERGE_METHODS, "merge options")


def run(args: argparse.Namespace) -> int:
    from deltaserve.experts.expert import ExpertFormatError
    from deltaserve.experts.merge import MERGE_METHODS, METHOD_ALIASES
    from deltaserve.experts.merge.checkpoint import MergeError, merge_into_checkpoint

    require_dir(args.base, "config.json", "--base")
    if args.weights and len(args.weights) != len(args.experts):
        raise SystemExit(f"error: {len(args.weights)} --weights for {len(args.experts)} --experts")
    method = METHOD_ALIASES.get(args.method, args.method)
    options = options_from_args(args, MERGE_METHODS, method)
    parse_options(MERGE_METHODS, method, options)
    try:
        merge_into_checkpoint(args.base, args.experts, args.out, method=method, weights=args.weights,
                              scale=args.scale, **options)
    except (MergeError, ExpertFormatError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    print(f"merged {len(args.experts)} experts with {method} into {args.out}")
    return 0
