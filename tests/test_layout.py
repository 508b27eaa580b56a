"""The house rules that a grep can check: imports point down, the zoo stays out of the product, sizes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("experts", "router", "server")
# package -> top-level packages it may import from this repository
ALLOWED = {"experts": {"experts"}, "router": {"experts", "router"}, "server": {"experts", "router", "server"},
           "zoo": {"experts", "zoo"}}
ZOO_USERS = tuple(REPO / "server" / "commands" / f for f in ("zoo.py", "eval.py", "demo.py"))   # `deltaserve zoo|eval|demo`
OURS = {"experts", "router", "server", "zoo", "bench", "tests"}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & OURS


def _files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_down(package):
    wrong = {}
    for path in _files(package):
        allowed = ALLOWED[package] | ({"zoo"} if path in ZOO_USERS else set())
        if bad := _imports(path) - allowed:
            wrong[str(path.relative_to(REPO))] = sorted(bad)
    assert not wrong, f"upward or zoo imports: {wrong}"


def test_the_zoo_is_imported_by_the_zoo_commands_only():
    users = [str(p.relative_to(REPO)) for pkg in PRODUCT for p in _files(pkg) if "zoo" in _imports(p)]
    assert users == ["server/commands/demo.py", "server/commands/eval.py", "server/commands/zoo.py"]


def test_product_files_and_functions_stay_small():
    long_files, long_functions = [], []
    for package in PRODUCT:
        for path in _files(package):
            text = path.read_text()
            if text.count("\n") > MAX_FILE_LINES:
                long_files.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    reason = "long because" in (ast.get_docstring(node) or "")
                    if length > MAX_FUNCTION_LINES and not reason:
                        long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length})")
    assert not long_files and not long_functions, (long_files, long_functions)


def test_readme_lists_every_registered_method_with_its_options():
    from server.methods import families_markdown

    assert families_markdown() in (REPO / "README.md").read_text(), \
        "README's Methods tables differ from the registries: paste `deltaserve methods` into README.md"
