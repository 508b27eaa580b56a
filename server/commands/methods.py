"""``deltaserve methods``: every registered family and its options, as tables (the docs' Methods page).

``deltaserve methods`` prints this; the docs' Methods page is generated from it
(docs/hooks.py), so the docs cannot drift from the registries.
"""

from __future__ import annotations

from deltaserve.experts.registry import Registry


def families() -> list[tuple[str, Registry]]:
    from deltaserve.experts.codecs import CODECS
    from deltaserve.experts.compress import COMPRESSORS
    from deltaserve.experts.merge import MERGE_METHODS
    from deltaserve.router import ROUTERS

    return [("Compression methods (`compress --method`, `compression.method`)", COMPRESSORS),
            ("Codecs (how an expert's tensors are stored)", CODECS),
            ("Merge methods (`merge --method`, recipes `method(options):a+b`)", MERGE_METHODS),
            ("Routers (`serve --router`, `--router-option`)", ROUTERS)]


def families_markdown() -> str:
    out = []
    for title, registry in families():
        out += [f"#### {title}", "", "| name | what | options (default) |", "| --- | --- | --- |"]
        for row in registry.describe():
            options = "; ".join(f"`{o['name']}` ({_default(o['default'])})" for o in row["options"]) or "-"
            doc = row["doc"].replace("|", "\\|")
            out.append(f"| `{row['name']}` | {doc} | {options} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def _default(value: object) -> str:
    return "none" if value is None else str(value)


HELP = "list compressors, codecs, merge methods and routers with their options"


def add_arguments(p) -> None:
    """No arguments."""


def run(args) -> int:
    print(families_markdown())
    return 0
