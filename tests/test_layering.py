"""The package's imports point down one layer order, with no cycle, and no import hides in a function.

pyproject.toml's ``[tool.importlinter]`` contract lists the layers; ``lint-imports``
checks it. Independently of that tool, these tests read every module of the package
with ``ast`` (imports inside functions included), check that the import graph has no
cycle, and that imports of the package's own modules sit at the top of each module,
except for the optional dependencies listed below.
"""

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "guided_diffusion"

# (module, imported module) pairs allowed as function-local imports, each an optional
# dependency: {pair: which optional dependency it is}. None in the package today.
OPTIONAL_LOCAL_IMPORTS = {}


def package_modules(root=REPO / PACKAGE):
    """``{dotted module name: path}`` for every module of the package, subpackages included."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _package_of(module, path):
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _imported(node, module, path, modules):
    """The package modules that the import statement ``node`` in ``module`` imports."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return [name for name in names if name in modules]
    if node.level:
        base = _package_of(module, path)
        for _ in range(node.level - 1):
            base = base.rpartition(".")[0]
        target = f"{base}.{node.module}" if node.module else base
    else:
        target = node.module or ""
    found = []
    for alias in node.names:
        submodule = f"{target}.{alias.name}"
        if submodule in modules:
            found.append(submodule)
        elif target in modules:
            found.append(target)
    return found


class _Imports(ast.NodeVisitor):
    """Collects ``(imported module, line, inside a function)`` for one module."""

    def __init__(self, module, path, modules):
        self.module, self.path, self.modules = module, path, modules
        self.depth = 0
        self.found = []

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Import(self, node):
        for target in _imported(node, self.module, self.path, self.modules):
            self.found.append((target, node.lineno, self.depth > 0))

    visit_ImportFrom = visit_Import


def module_imports():
    """``{module: [(imported module, line, inside a function), ...]}`` over the whole package."""
    modules = package_modules()
    found = {}
    for module, path in modules.items():
        visitor = _Imports(module, path, modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        found[module] = [entry for entry in visitor.found if entry[0] != module]
    return found


def import_graph():
    """``{module: {imported module: (line, inside a function)}}``, the first import of each."""
    return {
        module: {target: (line, local) for target, line, local in reversed(entries)}
        for module, entries in module_imports().items()
    }


def find_cycle(graph):
    """One import cycle as a list of modules ``[a, b, ..., a]``, or None."""
    done, on_path = set(), []
    position = {}

    def visit(module):
        position[module] = len(on_path)
        on_path.append(module)
        for target in sorted(graph.get(module, ())):
            if target in position:
                return on_path[position[target]:] + [target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        on_path.pop()
        del position[module]
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done:
            cycle = visit(module)
            if cycle:
                return cycle
    return None


def _short(module):
    return module[len(PACKAGE) + 1:] if module.startswith(PACKAGE + ".") else module


def describe_cycle(graph, cycle):
    steps = []
    for source, target in zip(cycle, cycle[1:]):
        line, local = graph[source][target]
        where = " (inside a function)" if local else ""
        steps.append(f"{_short(source)} -> {_short(target)} at {_short(source)}.py:{line}{where}")
    return "\n  ".join(steps)


# ------------------------------------------------------------------------------ the tests


@pytest.mark.skipif(importlib.util.find_spec("importlinter") is None,
                    reason="import-linter is not installed (pip install -e .[test] installs it)")
def test_import_linter_contracts_are_kept():
    paths = [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))  # this checkout, not an installed copy
    result = subprocess.run(
        [sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
         "--no-cache"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, (
        "lint-imports found imports against the layers of pyproject.toml's [tool.importlinter]; "
        "import only from lower layers (or move the module):\n" + result.stdout[-4000:] + result.stderr[-2000:]
    )


def test_the_graph_reader_sees_the_package():
    graph = import_graph()
    assert f"{PACKAGE}.train_util" in graph
    assert f"{PACKAGE}.dist_util" in graph[f"{PACKAGE}.train_util"]


def test_cycle_finder_reports_the_path():
    graph = {"p.a": {"p.b": (3, False)}, "p.b": {"p.c": (5, True)}, "p.c": {"p.a": (7, False)}, "p.d": {}}
    assert find_cycle(graph) == ["p.a", "p.b", "p.c", "p.a"]
    assert find_cycle({"p.a": {"p.b": (1, False)}, "p.b": {}}) is None


def test_the_package_imports_have_no_cycle():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle (function-local imports count):\n  " + describe_cycle(graph, cycle)


def _local_imports():
    return {
        (_short(module), _short(target)): f"{_short(module)}.py:{line}"
        for module, entries in module_imports().items()
        for target, line, local in entries
        if local
    }


def test_package_imports_inside_functions_are_only_the_optional_ones():
    unexpected = {pair: where for pair, where in _local_imports().items()
                  if pair not in OPTIONAL_LOCAL_IMPORTS}
    assert not unexpected, (
        "imports of the package's own modules inside functions: "
        + ", ".join(f"{where} imports {target}" for (_, target), where in sorted(unexpected.items()))
        + ". Import at the top of the module; if that makes a cycle, the module sits in the wrong layer. "
        "Only an optional dependency may be imported locally (add it to OPTIONAL_LOCAL_IMPORTS, saying which)."
    )


def test_the_local_import_allow_lists_hold_no_stale_entries():
    stale = set(OPTIONAL_LOCAL_IMPORTS) - set(_local_imports())
    assert not stale, f"no such function-local import any more; remove from the allow-list: {sorted(stale)}"
