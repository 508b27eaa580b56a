"""Command-line flags derived from a registry's options models (experts.registry), for the commands that
name a compressor or merge method.

Every option of every member becomes one ``--flag`` (``max_weight`` ->
``--max-weight``) with its type, bounds and description, and the help says
which members take it. ``options_from_args`` picks the flags given for one
member and refuses the ones that member does not take, listing its options.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from deltaserve.experts.registry import Registry

DEST_PREFIX = "opt_"


def _flag_type(annotation: Any) -> tuple[Any, list[Any] | None]:
    """(argparse type, choices) for an options field's annotation."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin is typing.Literal:
        return type(args[0]), list(args)
    if args and origin is not None:            # Optional[int], int | None, Annotated[...]
        return _flag_type(args[0])
    if annotation is bool:
        return _bool, None
    return annotation if annotation in (int, float, str) else str, None


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return lowered in ("true", "1", "yes")


def add_option_flags(parser: argparse.ArgumentParser, registry: Registry, title: str) -> None:
    """One flag per option name across ``registry``'s members (in a group titled ``title``)."""
    fields: dict[str, tuple[Any, str, list[str]]] = {}
    for name in sorted(registry):
        for field, info in registry.options_model(name).model_fields.items():
            annotation, doc, members = fields.get(field, (info.annotation, info.description or "", []))
            fields[field] = (annotation, doc, [*members, f"{name}={info.default}"])
    group = parser.add_argument_group(title, f"options of the {registry.plural} (default per {registry.kind})")
    for field, (annotation, doc, members) in sorted(fields.items()):
        kind, choices = _flag_type(annotation)
        group.add_argument(f"--{field.replace('_', '-')}", dest=DEST_PREFIX + field, type=kind, choices=choices,
                           default=None, metavar=None if choices else field.upper(),
                           help=f"{doc} [{', '.join(members)}]")


def options_from_args(args: argparse.Namespace, registry: Registry, name: str) -> dict[str, Any]:
    """The option flags given for member ``name``; a flag it does not take is an error naming its options."""
    given = {k[len(DEST_PREFIX):]: v for k, v in vars(args).items() if k.startswith(DEST_PREFIX) and v is not None}
    valid = registry.options_model(name).model_fields
    wrong = sorted(k for k in given if k not in valid)
    if wrong:
        flags = ", ".join("--" + k.replace("_", "-") for k in wrong)
        takes = ", ".join("--" + k.replace("_", "-") for k in valid) or "no options"
        raise SystemExit(f"error: {flags} does not apply to {registry.kind} {name!r} (it takes {takes})")
    return given
