"""The package's import structure: every module imports on its own in a fresh interpreter, the
module-level imports between fedinstruct's modules form no cycle, and the apps never import
fedinstruct.deploy (only the deployment tooling does)."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = "fedinstruct"
DEPLOY = f"{PACKAGE}.deploy"


def module_files(package_dir: Path) -> dict[str, Path]:
    """Every module of the package (packages included) and its file.

    The names are those pkgutil.walk_packages lists; this walks with pkgutil.iter_modules
    folder by folder instead, because walk_packages imports each package to descend into it,
    and nothing of fedinstruct should be imported by the test process itself."""

    def walk(folder: Path, prefix: str):
        for info in pkgutil.iter_modules([str(folder)], prefix):
            leaf = info.name.rsplit(".", 1)[-1]
            if info.ispkg:
                yield info.name, folder / leaf / "__init__.py"
                yield from walk(folder / leaf, f"{info.name}.")
            else:
                yield info.name, folder / f"{leaf}.py"

    return {PACKAGE: package_dir / "__init__.py", **dict(walk(package_dir, f"{PACKAGE}."))}


@pytest.fixture(scope="module")
def modules(repo_root) -> dict[str, Path]:
    found = module_files(repo_root / PACKAGE)
    assert len(found) > 10 and all(path.is_file() for path in found.values())
    return found


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(tree: ast.Module, module_level: bool = True) -> list[ast.stmt]:
    """The import statements that run: at module level only (the body, if/else, try, with and
    class bodies; not function bodies), or anywhere with module_level=False. Imports under
    `if TYPE_CHECKING:` never run and are left out either way."""
    found: list[ast.stmt] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            elif isinstance(node, ast.If):
                if not is_type_checking(node.test):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                if not module_level:
                    visit(node.body)
            else:
                for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                    children = getattr(node, field, None)
                    if isinstance(children, list):
                        visit([c for c in children if isinstance(c, ast.AST)])

    visit(tree.body)
    return found


def imported_modules(name: str, path: Path, known: set[str], module_level: bool = True
                     ) -> set[str]:
    """fedinstruct modules that `name` imports (`from pkg import sub` counts as pkg.sub)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    targets: set[str] = set()
    for node in runtime_imports(tree, module_level):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:  # relative: resolved against this module's package
            parts = name.split(".") if is_package else name.split(".")[:-1]
            parts = parts[:len(parts) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            targets.add(sub if sub in known else base)
    return {t for t in targets if t in known}


def import_graph(modules: dict[str, Path], module_level: bool = True) -> dict[str, set[str]]:
    known = set(modules)
    return {name: imported_modules(name, path, known, module_level) - {name}
            for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_cycle_finder_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]


def test_import_graph_reads_module_level_imports_only(tmp_path):
    package = tmp_path / "fedinstruct"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .leaf import x\n")
    (package / "sub" / "leaf.py").write_text(textwrap.dedent("""
        from typing import TYPE_CHECKING
        from fedinstruct import other
        if TYPE_CHECKING:
            from fedinstruct import typed
        try:
            from .. import deploy
        except ImportError:
            pass
        def later():
            from fedinstruct.sub import lazy
        x = 1
    """))
    for leaf in ("other", "typed", "deploy", "sub/lazy"):
        (package / f"{leaf}.py").write_text("")
    found = module_files(package)
    assert set(found) == {"fedinstruct", "fedinstruct.sub", "fedinstruct.sub.leaf",
                          "fedinstruct.other", "fedinstruct.typed", "fedinstruct.deploy",
                          "fedinstruct.sub.lazy"}
    graph = import_graph(found)
    assert graph["fedinstruct.sub"] == {"fedinstruct.sub.leaf"}
    assert graph["fedinstruct.sub.leaf"] == {"fedinstruct.other", "fedinstruct.deploy"}
    anywhere = import_graph(found, module_level=False)
    assert anywhere["fedinstruct.sub.leaf"] == {"fedinstruct.other", "fedinstruct.deploy",
                                                "fedinstruct.sub.lazy"}


def test_module_level_imports_form_no_cycle(modules):
    cycle = find_cycle(import_graph(modules))
    assert cycle is None, "import cycle between fedinstruct modules: " + " -> ".join(cycle)


def test_only_fedinstruct_deploy_imports_fedinstruct_deploy(modules):
    """The ServerApp, the ClientApp and the rest of the package run without the deployment
    tooling: no import of fedinstruct.deploy outside it, at module level or in a function."""
    graph = import_graph(modules, module_level=False)
    offenders = {
        name: sorted(t for t in targets if t == DEPLOY or t.startswith(f"{DEPLOY}."))
        for name, targets in graph.items()
        if name != DEPLOY and not name.startswith(f"{DEPLOY}.")
    }
    offenders = {name: targets for name, targets in offenders.items() if targets}
    assert not offenders, f"modules outside {DEPLOY} import it: {offenders}"


# Imports each module with no fedinstruct module loaded, as a fresh interpreter would (a cycle
# shows as an ImportError of a partially initialized module), keeping the third-party libraries
# loaded in between so that one interpreter does them all in seconds.
IMPORT_EACH = """
import importlib, json, sys, traceback

def drop_package():
    for loaded in [m for m in sys.modules if m == "fedinstruct" or m.startswith("fedinstruct.")]:
        del sys.modules[loaded]

results = {}
for name in json.loads(sys.argv[1]):
    drop_package()
    try:
        importlib.import_module(name)
    except BaseException:
        results[name] = {"error": traceback.format_exc(limit=-6)}
    else:
        results[name] = {"deploy": sorted(m for m in sys.modules
                                          if m == "fedinstruct.deploy"
                                          or m.startswith("fedinstruct.deploy."))}
print("RESULTS " + json.dumps(results))
"""


@pytest.mark.slow  # a fresh interpreter per module: ~13 s; the static cycle check stays fast
def test_every_module_imports_on_its_own(modules, repo_root):
    names = sorted(modules)
    done = subprocess.run([sys.executable, "-c", IMPORT_EACH, json.dumps(names)],
                          capture_output=True, text=True, timeout=120, cwd=repo_root)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(li for li in done.stdout.splitlines() if li.startswith("RESULTS "))
    results = json.loads(line.removeprefix("RESULTS "))
    assert set(results) == set(names)
    failed = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not failed, "\n\n".join(f"import {name} failed:\n{err}"
                                   for name, err in failed.items())
    pulled_deploy = {name: r["deploy"] for name, r in results.items()
                     if r["deploy"] and name != DEPLOY and not name.startswith(f"{DEPLOY}.")}
    assert not pulled_deploy, f"importing these loads {DEPLOY}: {pulled_deploy}"
