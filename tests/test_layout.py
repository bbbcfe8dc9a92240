"""The project's layout rules (SYSTEM.md section 1), checked on the source tree itself.

- every top-level package imports after installation;
- dependencies point one way: leaf packages import nothing of ours, VRNN imports only the leaves,
  the facades import only VRNN;
- nobody edits sys.path.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"VRNN", "world_model", "training", "perceiver_io", "temporal_dynamics", "multi_task_learning"}
LEAVES = {"perceiver_io", "temporal_dynamics", "multi_task_learning"}
ALLOWED = {
    **{leaf: set() for leaf in LEAVES},
    "VRNN": LEAVES | {"VRNN"},
    "world_model": {"VRNN"},
    "training": {"VRNN"},
}


def _python_files(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(OURS))
def test_package_imports(package):
    module = importlib.import_module(package)
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().is_relative_to(ROOT), f"{package} resolves outside the repository"


@pytest.mark.parametrize("package", sorted(OURS))
def test_dependency_direction(package):
    offenders = []
    for path in _python_files(package):
        ours = _imported_top_levels(path) & OURS
        own = {package}
        bad = ours - ALLOWED[package] - own
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "dependency direction violated:\n" + "\n".join(offenders)


def test_no_sys_path_edits():
    offenders = []
    for path in ROOT.rglob("*.py"):
        if ".venv" in path.parts or "build" in path.parts:
            continue
        text = path.read_text()
        if any(f"sys.path.{verb}" in text for verb in ("append", "insert")):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"sys.path is edited in {offenders}"


def test_importing_facades_does_not_load_dm_control():
    import subprocess
    import sys

    code = "import sys, world_model, training; print('dm_control' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "False", "importing the facades started dm_control"
