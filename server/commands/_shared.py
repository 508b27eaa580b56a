"""What several commands share: argument checks, registry options, examples files, the manifest table."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DEFAULT_ZOO_ROOT = Path(".cache/zoo")


def require_dir(path: Path, marker: str, what: str) -> Path:
    """Exit with a clear message unless ``path`` is a directory holding ``marker``."""
    if not path.is_dir():
        raise SystemExit(f"error: {what} {path} is not a directory")
    if not (path / marker).is_file():
        raise SystemExit(f"error: {what} {path} has no {marker}")
    return path


def parse_options(registry: Any, name: str, options: dict[str, Any]) -> Any:
    """Checked options, or exit with the flag and the problem."""
    from deltaserve.experts.registry import OptionsError

    try:
        return registry.parse_options(name, options)
    except OptionsError as err:
        flag = f"--{err.param.replace('_', '-')}: " if err.param else ""
        raise SystemExit(f"error: {flag}{err}") from None


def add_examples_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", type=Path, help="chat-example JSONL: NPS's objective, and the expert's measured "
                                                    "quality (its calibration score)")
    p.add_argument("--training", type=Path, help="chat-example JSONL the values are re-trained on (sparse_ft)")
    p.add_argument("--task", help="a label for the expert's skill, recorded in the manifest")


def compression_helpers(method: str | None, base: Path, args: argparse.Namespace,
                        options: dict[str, Any]) -> tuple[Any, Any]:
    """NPS's objective / sparse_ft's trainer / the measured quality from the examples files given
    (experts.compress.compression_helpers); a missing file exits naming its flag."""
    from deltaserve.experts.sources import MissingExamples
    from deltaserve.experts.sources import compression_helpers as helpers
    from deltaserve.experts.examples import ExampleError, read_examples

    try:
        calibration = read_examples(args.calibration) if args.calibration else None
        training = read_examples(args.training) if args.training else None
        return helpers(base, method, options, calibration, training)
    except MissingExamples as err:
        raise SystemExit(f"error: --method {method} needs --{err.param} FILE.jsonl ({err}; `deltaserve zoo data` "
                         "writes them for the zoo's tasks)") from None
    except (ExampleError, OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None


def print_manifest(manifest: Any, path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"expert {manifest.name} ({path})", show_header=False)
    for key, value in manifest_rows(manifest):
        table.add_row(key, value)
    Console().print(table)


def manifest_rows(m: Any) -> list[tuple[str, str]]:
    return [("kind", m.kind), ("task", m.task or "-"), ("codec", m.codec),
            ("density", "-" if m.density is None else f"{m.density:.4f}"),
            ("rank", "-" if m.rank is None else str(m.rank)),
            ("bytes", f"{m.bytes:,}"), ("bits/param", f"{m.bits_per_param:.3f}"),
            ("base params", f"{m.base_params:,}"), ("carried", ", ".join(m.carried) or "-"),
            ("method", json.dumps({k: v for k, v in m.method.items() if k != "history"})),
            ("calibration", _calibration(m)),
            ("source", m.source), ("base fingerprint", m.base_fingerprint), ("created", m.created)]


def _calibration(m: Any) -> str:
    if m.calibration is not None:
        c = m.calibration
        return f"exact match {c.exact:.1%}, token accuracy {c.token_accuracy:.1%} on {c.examples} examples"
    return "-" if m.calibration_score is None else f"graded score {m.calibration_score:.3f}"
