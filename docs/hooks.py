"""MkDocs hooks: pages generated from the code at build time, and links to repository files checked.

- ``<!-- generated: methods -->`` in a page becomes ``families_markdown()``: the tables of every registry
  (compression methods, codecs, merge methods, routers) with their options, as ``deltaserve methods``
  prints them.
- ``<!-- generated: families -->`` becomes the model-family support table from ``results/families.json``
  (what ``tests/test_families.py`` measured; the test fails when the file says otherwise).
- ``<!-- generated: cli -->`` becomes the ``--help`` of every ``deltaserve`` subcommand, sub-subcommands
  (``zoo build``, ``store add``, ...) included, from ``build_parser()``.
- A link from a page to a file outside ``docs/`` (``../results/README.md``, ``../helm/deltaserve/values.yaml``)
  works on GitHub but is not part of the site: the hook checks that the file exists (a warning, so
  ``mkdocs build --strict`` fails when it does not) and renders the link as its text. An image outside
  ``docs/`` (a results plot) is copied into the site under ``_repo/`` and shown from there.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HELP_COLUMNS = "100"
log = logging.getLogger("mkdocs.hooks.deltaserve")

REPO_PREFIX = "_repo"
# [text](target) and ![alt](target); the target has no scheme and no leading slash.
_LINK = re.compile(r"(?P<image>!?)\[(?P<text>[^\]\n]*)\]\((?P<target>(?![a-z][a-z0-9+.-]*:|/|#)[^)\s]+)\)")
_FENCE = re.compile(r"^(```|~~~)")


def methods_markdown() -> str:
    from deltaserve.server.commands.methods import families_markdown

    return families_markdown()


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    return [(name, sub) for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name, sub in action.choices.items()]


def _help_sections(parser: argparse.ArgumentParser, level: int) -> list[str]:
    out = [f"{'#' * level} `{parser.prog}`", "", "```text", parser.format_help().rstrip(), "```", ""]
    for _, sub in _subcommands(parser):
        out += _help_sections(sub, level + 1)
    return out


def cli_markdown() -> str:
    """Every subcommand's ``--help``, in the parser's order, at a fixed width."""
    from deltaserve.server.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS
    try:
        return "\n".join(_help_sections(build_parser(), 2)).rstrip() + "\n"
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


FAMILY_COLUMNS = ("base", "lora", "dense", "merge", "router")


def families_markdown() -> str:
    """The support table: one row per family the families test ran (``results/families.json``, written by
    ``tests/test_families.py``), what each path measured against HF transformers."""
    import json

    recorded = json.loads((REPO / "results" / "families.json").read_text())
    rows = ["| family | vLLM model class | " + " | ".join(FAMILY_COLUMNS) + " |",
            "|---|---|" + "---|" * len(FAMILY_COLUMNS)]
    for name, row in sorted(recorded["families"].items()):
        rows.append(f"| {name} (`{row['config']}`) | `{row['model']}` | "
                    + " | ".join(row[c] for c in FAMILY_COLUMNS) + " |")
    when = f" at commit `{recorded['git_commit'][:12]}` on {recorded['date'][:10]}" if "git_commit" in recorded else ""
    return "\n".join(rows) + f"\n\nMade by `{recorded['command']}`{when}.\n"


GENERATED = {"methods": methods_markdown, "cli": cli_markdown, "families": families_markdown}


def render_generated(markdown: str) -> str:
    for name, make in GENERATED.items():
        marker = f"<!-- generated: {name} -->"
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown


def _outside(target: str, page_path: Path, docs_dir: Path) -> Path | None:
    """The repository file a link points at when it is outside ``docs_dir``, else None."""
    target = target.split("#", 1)[0]
    if not target:
        return None
    resolved = (page_path.parent / target).resolve()
    return None if resolved.is_relative_to(docs_dir.resolve()) else resolved


def _prose_lines(markdown: str):
    """(line, in a fenced code block) for every line."""
    in_fence = False
    for line in markdown.splitlines(keepends=True):
        fence = bool(_FENCE.match(line.lstrip()))
        yield line, in_fence or fence
        if fence:
            in_fence = not in_fence


def repo_links(markdown: str, page_path: Path, docs_dir: Path) -> tuple[str, list[str]]:
    """Links to repository files outside ``docs_dir`` rendered as their text, images pointed at their copy
    under ``_repo/``; returns the new text and the targets that do not exist."""
    missing, out = [], []
    page_dir = page_path.parent.relative_to(docs_dir)

    def replace(match: re.Match) -> str:
        resolved = _outside(match["target"], page_path, docs_dir)
        if resolved is None:
            return match[0]
        if not resolved.exists():
            missing.append(match["target"])
        if not match["image"]:
            return match["text"]
        copy = Path(REPO_PREFIX) / resolved.relative_to(REPO)
        return f"![{match['text']}]({os.path.relpath(copy, page_dir)})"

    for line, in_code in _prose_lines(markdown):
        out.append(line if in_code else _LINK.sub(replace, line))
    return "".join(out), missing


def on_files(files, config):
    """Copy the images that pages show from outside ``docs/`` into the site under ``_repo/``."""
    from mkdocs.structure.files import File

    docs_dir = Path(config["docs_dir"])
    wanted = set()
    for page in files.documentation_pages():
        for line, in_code in _prose_lines(Path(page.abs_src_path).read_text(encoding="utf-8")):
            for match in [] if in_code else _LINK.finditer(line):
                resolved = _outside(match["target"], docs_dir / page.src_path, docs_dir)
                if match["image"] and resolved is not None and resolved.is_file():
                    wanted.add(resolved)
    for path in sorted(wanted):
        uri = (Path(REPO_PREFIX) / path.relative_to(REPO)).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    markdown = render_generated(markdown)
    docs_dir = Path(config["docs_dir"])
    markdown, missing = repo_links(markdown, docs_dir / page.file.src_path, docs_dir)
    for target in missing:
        log.warning("%s links to %s, which does not exist in the repository", page.file.src_path, target)
    return markdown
