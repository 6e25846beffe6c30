"""Every ``from neoray... import name`` in the repository resolves, function-level imports included.

A module move (as the checkpoints/ renovation was) otherwise breaks only the code paths that run late: the GPU
check's engine section failed on the one import the move missed.
"""

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("neoray", "benchmarks", "experiments", "tests")


def neoray_imports() -> list[tuple[str, int, str, str]]:
    found = []
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("neoray"):
                    found += [(str(path.relative_to(ROOT)), node.lineno, node.module, a.name) for a in node.names]
                elif isinstance(node, ast.Import):
                    found += [(str(path.relative_to(ROOT)), node.lineno, a.name, "") for a in node.names
                              if a.name.startswith("neoray")]
    return found


def test_the_scan_sees_function_level_imports():
    assert any(module == "neoray.checkpoints" and where.startswith("benchmarks/gpu_check.py")
               for where, _, module, _ in neoray_imports())


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_neoray_import_resolves(folder):
    broken = []
    for where, line, module, name in neoray_imports():
        if not where.startswith(folder + "/"):
            continue
        try:
            imported = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            broken.append(f"{where}:{line}: {module}: {exc}")
            continue
        if name and name != "*" and not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ModuleNotFoundError:
                broken.append(f"{where}:{line}: {module} has no {name}")
    assert not broken, "\n".join(broken)
