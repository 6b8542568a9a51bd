"""No import circle: the package's modules import one another as a graph without a cycle.

The graph is read from the source with `ast`: every import statement of a file, at module level or
inside a function or class (an import inside a function still ties the two modules together, it only
runs later), relative or absolute; `from robint_ray import x` names the module x where x is one, else
the package. Left out: imports under `if TYPE_CHECKING:`, which never run (a stage module of the study
names `Study` for its annotations there, while `study.core` runs the stages).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "robint_ray"


def module_files(package: Path) -> dict[str, Path]:
    """{dotted module name: file} of every module of the package (a sub-package by its __init__.py)."""
    files = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The modules of `modules` that the file of module `name` imports, anywhere in the file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and _type_checking(block.test)
        for node in ast.walk(block)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package, one level up per dot after the first
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """{module: the package's modules it imports}."""
    files = module_files(package)
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a] (a imports b, ...), or None where there is none."""
    on_path: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> list[str] | None:
        on_path.append(node)
        for target in sorted(graph.get(node, ())):
            if target in on_path:
                return on_path[on_path.index(target) :] + [target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        on_path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        if node not in done:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_imports_without_a_circle():
    graph = import_graph()
    assert len(graph) > 40 and "robint_ray.commands.doctor" in graph  # the whole package was read
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


@pytest.mark.parametrize(
    "back",
    [
        ("robint_ray.attacks", "robint_ray.config"),  # check_ball back in config
        ("robint_ray.storage", "robint_ray.distributed"),  # the preflight back beside Location
        ("robint_ray.cluster", "robint_ray.distributed"),  # wait_for_room starting Ray itself
        ("robint_ray.cluster", "robint_ray.study"),  # doctor's shipped-config check back in cluster
    ],
)
def test_the_check_finds_a_back_import_restored(back):
    """One of the imports that closed the circle before, put back into today's graph: a cycle through
    both modules is reported."""
    graph = import_graph()
    importer, imported = back
    assert imported not in graph[importer]
    graph[importer] = graph[importer] | {imported}
    cycle = find_cycle(graph)
    assert cycle is not None and {importer, imported} <= set(cycle), cycle
    assert all(b in graph[a] for a, b in zip(cycle, cycle[1:]))  # a real path of imports


def test_the_graph_sees_imports_inside_functions_and_skips_type_checking(tmp_path):
    """A circle closed only by an import inside a function is one; an import under TYPE_CHECKING is not."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from . import b\n")
    (package / "b.py").write_text("def f():\n    from .a import g\n")
    (package / "c.py").write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from pkg import a\n")
    graph = import_graph(package)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": set()}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    assert find_cycle({"x": {"y"}, "y": {"z"}, "z": set()}) is None
