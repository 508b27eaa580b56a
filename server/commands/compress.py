"""``deltaserve compress``: compress a full fine-tune or a PEFT LoRA into an expert directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from deltaserve.server.commands._options import add_option_flags, options_from_args
from deltaserve.server.commands._shared import (add_examples_arguments, compression_helpers, parse_options,
                                                print_manifest, require_dir)

HELP = "compress a fine-tune or LoRA into an expert directory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from deltaserve.experts.compress import COMPRESSORS

    p.add_argument("--base", type=Path, required=True, help="base HF model directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--finetuned", type=Path, help="fully fine-tuned HF model directory")
    source.add_argument("--adapter", type=Path, help="PEFT LoRA adapter directory")
    p.add_argument("--method", choices=sorted(COMPRESSORS), default="nps")
    add_examples_arguments(p)
    p.add_argument("--name", help="expert name (default: the --out directory name)")
    p.add_argument("--out", type=Path, required=True, help="expert directory to write")
    add_option_flags(p, COMPRESSORS, "compression options")


def run(args: argparse.Namespace) -> int:
    from deltaserve.experts.compress import COMPRESSORS, compress_expert, extract

    require_dir(args.base, "config.json", "--base")
    if args.finetuned:
        require_dir(args.finetuned, "config.json", "--finetuned")
    if args.adapter:
        require_dir(args.adapter, "adapter_config.json", "--adapter")
    options = options_from_args(args, COMPRESSORS, args.method)
    checked = parse_options(COMPRESSORS, args.method, options)
    objective, trainer = compression_helpers(args.method, args.base, args, options)
    tv = extract(args.base, args.finetuned, args.adapter)
    try:
        manifest = compress_expert(tv, args.out, name=args.name or args.out.name, method=args.method,
                                   options=checked, objective=objective, trainer=trainer, task=args.task)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    print_manifest(manifest, args.out)
    return 0
