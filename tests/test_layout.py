"""The math/Ray boundary: the math modules take tensors and return tensors and know nothing about Ray.

Pure math modules import neither ray nor robint_ray.distributed anywhere (not even inside a function);
fid.py and evaluate.py hold a Ray fan-out beside their math, so for them importing the module must not
import Ray (their math stays usable and testable without it). The file layer (storage: `Location`) is
held to the same rule as the math: the check that every node shares an output location lives apart, in
cluster. (The package's __init__ reads which cluster this process joins through robint_ray.ray_address,
which imports no Ray.)"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "robint_ray"
PURE = [
    "models",
    "data",
    "attacks",
    "attributions",
    "visualize",
    "inception",
    "config",
    "checkpoint",
    "sweep",
    "files",
    "errors",
    "seeds",
    "shards",
    "storage",
]
MIXED = ["fid", "evaluate"]


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of the file names, at any depth, resolved against the package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            package = "robint_ray" + ".commands" * (node.level == 1 and path.parent.name == "commands")
            base = (package + "." if node.level else "") + (node.module or "")
            names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return names


@pytest.mark.parametrize("module", PURE)
def test_math_modules_never_import_ray(module):
    names = imported_modules(PACKAGE / f"{module}.py")
    assert not {n for n in names if n == "ray" or n.startswith("ray.")}, names
    assert not {n for n in names if n.startswith("robint_ray.distributed")}, names


@pytest.mark.parametrize("module", PURE + MIXED)
def test_importing_a_math_module_imports_no_ray(module):
    code = (
        f"import sys, robint_ray.{module}; "
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_check_sees_a_function_level_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    import ray.util\n    from .distributed import fan_out\n")
    names = imported_modules(module)
    assert "ray.util" in names and "robint_ray.distributed.fan_out" in names


def test_the_commands_do_not_import_the_cli():
    """cli.py imports the command modules; they take what they share from commands/common.py (no cycle)."""
    for path in sorted((PACKAGE / "commands").glob("*.py")):
        names = imported_modules(path)
        assert not {n for n in names if n.startswith("robint_ray.cli")}, (path.name, names)


def function_level_imports(path: Path) -> list[str]:
    """'line: module' for every import statement inside a function or class of the file."""
    found = []
    for scope in ast.walk(ast.parse(path.read_text())):
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for node in ast.walk(scope):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found.append(f"{node.lineno}: {getattr(node, 'module', None) or node.names[0].name}")
    return found


def test_the_study_names_its_dependencies_at_the_top():
    """The study's modules import what they use at module level (none inside a function), so each
    file's head lists its dependencies."""
    for path in sorted((PACKAGE / "study").glob("*.py")):
        assert not function_level_imports(path), (path.name, function_level_imports(path))


def test_the_function_level_import_check_can_fail(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from .fid import open_source\n")
    assert function_level_imports(module) == ["4: fid"]


def test_the_cli_parser_loads_no_torch():
    """`robint --help` builds every command's parser: the commands import torch, Ray and the package's
    math inside their run(), so the parser alone loads none of them (it answers in a tenth of a second)."""
    code = (
        "import sys, robint_ray.cli as cli; cli.build_parser(); "
        "heavy = sorted(m for m in ('torch', 'ray', 'numpy', 'matplotlib') if m in sys.modules); "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_readme_layout_table_names_the_modules_this_test_holds():
    """The README's layout table groups the modules as this file does (math; math with a fan-out)."""
    readme = (PACKAGE.parent / "README.md").read_text()
    rows = {line.split("|")[1].strip(): line.split("|")[2] for line in readme.splitlines() if line.startswith("| math")}
    named = {group: set(re.findall(r"`(\w+)`", modules)) for group, modules in rows.items()}
    pure, mixed = (next(v for k, v in named.items() if k.startswith(start)) for start in ("math:", "math with"))
    assert pure == set(PURE)
    assert mixed == set(MIXED)
