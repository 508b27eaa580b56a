"""``deltaserve inspect``: an expert's kind, density, bytes, bits/param and provenance."""

from __future__ import annotations

import argparse
from pathlib import Path

from deltaserve.server.commands._shared import print_manifest

HELP = "show an expert's kind, density, bytes, bits/param and provenance"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("expert", type=Path)
    p.add_argument("--verify", action="store_true", help="also check file digests and decode every tensor")


def run(args: argparse.Namespace) -> int:
    from deltaserve.experts.expert import ExpertFormatError, load_expert

    try:
        expert = load_expert(args.expert, verify=args.verify)
    except ExpertFormatError as err:
        raise SystemExit(f"error: {err}") from None
    print_manifest(expert.manifest, args.expert)
    return 0
