"""The docs: the generated pages render the code, links in the repository's Markdown resolve, the README
stays short and describes what is, and every command block marked runnable runs.

A block is marked by an HTML comment on the line before its fence (invisible on GitHub and in the site):

    <!-- runnable -->           bash/python, in order, in one scratch directory per page holding base/,
                                finetune/, lora/ (the micro zoo's base, a full fine-tune, a LoRA) and calib.jsonl
    <!-- runnable: repo -->     in the repository root
    <!-- runnable: server -->   against ONE live server on the real base (SmolLM2-135M-Instruct) with random
                                experts under the names the examples use; localhost:8000 is rewritten to it

Costs: the scratch pages take seconds each on the micro zoo (an NPS search included); the server blocks
share one server start on the real base (about a minute on 2 cores) plus the random experts.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
KINDS = {None: "scratch", "repo": "repo", "server": "server"}
MARKER = re.compile(r"^<!-- runnable(?::\s*(?P<kind>[a-z]+))? -->\s*$")
FENCE = re.compile(r"^```(?P<lang>[a-z]*)\s*$")
LANGS = {"bash", "python"}
LOCAL_SERVER = re.compile(r"(?:https?://)?(?:localhost|127\.0\.0\.1):8000")
BLOCK_TIMEOUT_S = 600
HISTORY_WORDS = ("used to", "this time", "previous run", "earlier run", "rounds ago")
README_MAX_LINES = 250


@dataclass(frozen=True)
class Block:
    path: Path
    line: int          # 1-based line of the opening fence
    kind: str          # scratch | repo | server
    lang: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def parse_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """The runnable blocks of one Markdown file, and a problem for every marker that marks nothing runnable."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, problems = [], []
    for i, line in enumerate(lines):
        marker = MARKER.match(line)
        if not marker:
            continue
        where = f"{path.relative_to(REPO)}:{i + 1}"
        fence = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if marker["kind"] not in KINDS:
            problems.append(f"{where}: unknown marker kind {marker['kind']!r} (known: repo, server)")
        elif fence is None or fence["lang"] not in LANGS:
            problems.append(f"{where}: the marker must be followed by a ```bash or ```python fence")
        else:
            end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
            blocks.append(Block(path, i + 2, KINDS[marker["kind"]], fence["lang"], "\n".join(lines[i + 2:end]) + "\n"))
    return blocks, problems


ALL_BLOCKS = [b for path in DOC_FILES for b in parse_blocks(path)[0]]


def blocks_of(kind: str) -> list[Block]:
    return [b for b in ALL_BLOCKS if b.kind == kind]


def run_block(block: Block, cwd: Path, url: str | None = None) -> subprocess.CompletedProcess:
    code = block.code if url is None else LOCAL_SERVER.sub(url, block.code)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "TQDM_DISABLE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    cmd = ["bash", "-e", "-o", "pipefail", "-c", code] if block.lang == "bash" else [sys.executable, "-c", code]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)


def assert_ran(block: Block, proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (f"{block.id} exited {proc.returncode}\n--- block\n{block.code}"
                                  f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", REPO / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------- static checks


def test_every_marker_marks_a_bash_or_python_block():
    problems = [p for path in DOC_FILES for p in parse_blocks(path)[1]]
    assert not problems, "\n".join(problems)
    assert {b.kind for b in ALL_BLOCKS} == {"scratch", "repo", "server"}, "a marker kind lost all its blocks"


def test_methods_page_is_the_registries_tables():
    from deltaserve.server.commands.methods import families_markdown

    source = (REPO / "docs" / "methods.md").read_text(encoding="utf-8")
    rendered = load_hooks().render_generated(source)
    assert "<!-- generated: methods -->" in source and "<!-- generated:" not in rendered
    assert rendered.count(families_markdown()) == 1
    assert families_markdown() not in (REPO / "README.md").read_text(encoding="utf-8")   # one place: the docs


def test_families_page_is_the_support_table_the_family_tests_recorded():
    import json

    from tests.test_families import FAMILY_CASES

    source = (REPO / "docs" / "families.md").read_text(encoding="utf-8")
    rendered = load_hooks().render_generated(source)
    assert "<!-- generated: families -->" in source and "<!-- generated:" not in rendered
    recorded = json.loads((REPO / "results" / "families.json").read_text(encoding="utf-8"))["families"]
    assert set(recorded) == set(FAMILY_CASES)     # every family the tests run, and no other
    for name, row in recorded.items():
        assert f"| {name} (`{row['config']}`) | `{row['model']}` | {row['base']} | {row['lora']} |" in rendered


def test_cli_page_has_every_subcommands_help():
    import argparse

    from deltaserve.server.cli import build_parser

    rendered = load_hooks().render_generated((REPO / "docs" / "cli.md").read_text(encoding="utf-8"))
    assert "<!-- generated:" not in rendered

    def progs(parser):
        yield parser.prog
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from progs(sub)

    expected = list(progs(build_parser()))
    assert {"deltaserve zoo build", "deltaserve store add", "deltaserve serve"} <= set(expected)
    for prog in expected:
        assert f"`{prog}`" in rendered and f"usage: {prog}" in rendered, prog


def _relative_links(path: Path, hooks) -> list[tuple[str, Path]]:
    text = path.read_text(encoding="utf-8")
    links = []
    for line, in_code in hooks._prose_lines(text):
        if not in_code:
            for match in hooks._LINK.finditer(line):
                target = match["target"].split("#", 1)[0]
                if target:
                    links.append((match["target"], (path.parent / target).resolve()))
    return links


def test_links_in_the_repositorys_markdown_resolve():
    hooks = load_hooks()
    files = [*DOC_FILES, REPO / "deploy" / "README.md", *sorted((REPO / "results").rglob("*.md"))]
    broken = [f"{path.relative_to(REPO)} -> {target}" for path in files
              for target, resolved in _relative_links(path, hooks) if not resolved.exists()]
    assert not broken, "\n".join(broken)


def test_readme_is_short_and_the_docs_describe_what_is():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= README_MAX_LINES
    found = [f"{path.relative_to(REPO)}: {word!r}" for path in DOC_FILES
             for word in HISTORY_WORDS if word in path.read_text(encoding="utf-8").lower()]
    assert not found, "history belongs in commit messages:\n" + "\n".join(found)


# ---------------------------------------------------------------------------- runnable blocks


@pytest.fixture(scope="module")
def calib_jsonl(micro_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    proc = subprocess.run([sys.executable, "-m", "deltaserve.server.cli", "zoo", "data", "--task", "upper",
                           "--split", "calib", "--n", "16", "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return out


SCRATCH_PAGES = sorted({b.path for b in blocks_of("scratch")})


@pytest.mark.parametrize("page", SCRATCH_PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_runnable_blocks_run_in_a_scratch_directory(page, micro_zoo, calib_jsonl, tmp_path):
    (tmp_path / "base").symlink_to(micro_zoo.layout.base)
    (tmp_path / "finetune").symlink_to(micro_zoo.layout.full("upper"))
    (tmp_path / "lora").symlink_to(micro_zoo.layout.lora("upper"))
    shutil.copy(calib_jsonl, tmp_path / "calib.jsonl")
    for block in (b for b in blocks_of("scratch") if b.path == page):
        assert_ran(block, run_block(block, tmp_path))


@pytest.mark.parametrize("block", blocks_of("repo"), ids=lambda b: b.id)
def test_runnable_blocks_run_in_the_repository(block):
    assert_ran(block, run_block(block, REPO))


@pytest.mark.parametrize("block", blocks_of("server"), ids=lambda b: b.id)
def test_runnable_blocks_run_against_a_live_server(block, real_server, tmp_path):
    """Against the session's server on the real base (tests/conftest.py ``real_server``: the experts the examples
    name, the knn router, no keys)."""
    proc = run_block(block, tmp_path, url=real_server.url)
    assert_ran(block, proc)
    assert proc.stdout.strip(), f"{block.id} printed nothing"
