"""The package's imports point one way: no module imports, directly or through others, a module
that imports it back, and every module imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "apex_jax"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _imported(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """apex_jax modules that ``module`` imports anywhere in its source (functions included).

    A package counts only where its own names are imported (``from apex_jax import
    simulate``): ``import apex_jax.x`` runs the package's ``__init__`` too, but a package
    still being initialised lets its submodules load, so that is no cycle.
    """
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in known else base)
    return {name for name in found if name in known and name != module}


def import_graph() -> dict[str, set[str]]:
    """Module -> the apex_jax modules it imports, read from the AST of every module."""
    modules = _modules()
    known = set(modules)
    return {
        name: _imported(
            ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", known
        )
        for name, path in modules.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a closed path ``[a, b, ..., a]``, or ``None`` if acyclic."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert len(graph) > 20, sorted(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _deferred_package_imports(tree: ast.Module) -> list[int]:
    """Lines of apex_jax imports that are not statements of the module body itself (inside a
    function, a class, ``if`` or ``try``): such an import hides a cycle until it runs."""
    top = {id(node) for node in tree.body}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = ["apex_jax" if node.level else node.module or ""]
        else:
            continue
        if id(node) not in top and any(n.split(".")[0] == "apex_jax" for n in names):
            lines.append(node.lineno)
    return lines


def test_every_package_import_is_at_module_top():
    modules = _modules()
    deferred = {
        name: lines
        for name, path in modules.items()
        if (lines := _deferred_package_imports(ast.parse(path.read_text())))
    }
    assert deferred == {}


def test_the_cycle_finder_finds_a_cycle():
    acyclic = {"apex_jax.a": {"apex_jax.b"}, "apex_jax.b": {"apex_jax.c"}, "apex_jax.c": set()}
    assert find_cycle(acyclic) is None
    cyclic = dict(acyclic, **{"apex_jax.c": {"apex_jax.a"}})
    assert find_cycle(cyclic) == ["apex_jax.a", "apex_jax.b", "apex_jax.c", "apex_jax.a"]


def test_function_level_and_package_imports_count_as_edges():
    known = {"apex_jax", "apex_jax.cli", "apex_jax.x"}
    tree = ast.parse("import apex_jax.x\ndef f():\n    from apex_jax.cli import main\n")
    assert _imported(tree, "apex_jax.x", False, known) == {"apex_jax.cli"}
    tree = ast.parse("from apex_jax import simulate\nfrom . import cli\n")
    assert _imported(tree, "apex_jax.x", False, known) == {"apex_jax", "apex_jax.cli"}


def test_a_deferred_package_import_is_found():
    tree = ast.parse("import numpy\ndef f():\n    import json\n    from apex_jax import cli\n")
    assert _deferred_package_imports(tree) == [4]


# Each module first, alone: an import cycle that only bites in one import order shows up here.
_FRESH_IMPORTS = """
import importlib, sys
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "apex_jax" or m.startswith("apex_jax.")]:
        del sys.modules[loaded]
    importlib.import_module(name)
print("ok")
"""


@pytest.mark.slow
def test_every_module_imports_first_in_a_fresh_interpreter():
    names = sorted(_modules())
    out = subprocess.run(
        [sys.executable, "-c", _FRESH_IMPORTS, *names],
        cwd=PACKAGE_DIR.parent,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
