"""The packages are layers, and nothing imports upward (docs/architecture.md):

    device_profiles <- protocol <- edge_client, monitor <- converters <- coordinator

Read from the source with ``ast``, so that an import inside a function counts too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]

# What each package may import of fedprune besides itself (and the top-level ``fedprune``).
ALLOWED: dict[str, set[str]] = {
    "device_profiles": set(),
    "protocol": {"device_profiles"},
    "edge_client": {"device_profiles", "protocol"},
    "monitor": {"device_profiles", "protocol"},
    "converters": {"device_profiles", "protocol", "edge_client"},
    "coordinator": {"device_profiles", "protocol", "edge_client", "monitor", "converters"},
}


def _imports(path: Path) -> set[str]:
    """The fedprune subpackages a module imports (``fedprune.X...`` -> X)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "fedprune" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_every_package_has_a_layer() -> None:
    assert {p.removeprefix("fedprune.") for p in PACKAGES if p != "fedprune"} == set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_no_module_imports_a_package_above_its_own(package: str) -> None:
    # Prepare
    folder = ROOT / PACKAGES[f"fedprune.{package}"]

    # Execute
    upward = {
        f"{path.relative_to(ROOT)} imports fedprune.{imported}"
        for path in sorted(folder.rglob("*.py"))
        for imported in _imports(path) - ALLOWED[package] - {package}
    }

    # Assert
    assert upward == set()


def test_the_round_loop_and_its_parts_import_without_tensorflow() -> None:
    # Prepare: TensorFlow made impossible to import, as on a machine without it
    code = """
import importlib.abc, sys

class NoTensorFlow(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("tensorflow", "tf_keras", "tensorflow_model_optimization"):
            raise ModuleNotFoundError(name)
        return None

sys.meta_path.insert(0, NoTensorFlow())
import fedprune.coordinator.aggregator
import fedprune.coordinator.downlink
import fedprune.coordinator.fleet
import fedprune.coordinator.intake
import fedprune.coordinator.rounds
"""

    # Execute
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
