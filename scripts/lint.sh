#!/usr/bin/env bash
# Formatting, lint and types in one command (run after scripts/setup.sh); their settings, strict
# mypy among them, are in pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff format --check .
.venv/bin/ruff check .

# mypy checks the packages under the names they install as (fedprune.*). It cannot follow
# setuptools' package-dir mapping, so it reads a tree of links laid out like the installed package
# (made from pyproject.toml's mapping), and its messages name the repository's files again.
tree=.cache/typecheck
rm -rf "$tree"
.venv/bin/python - "$tree" <<'PY'
import sys, tomllib
from pathlib import Path

tree = Path(sys.argv[1])
mapping = tomllib.loads(Path("pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
for package, folder in mapping.items():
    target = tree.joinpath(*package.split("."))
    target.mkdir(parents=True, exist_ok=True)
    for source in Path(folder).iterdir():
        if source.suffix in (".py", ".typed"):
            (target / source.name).symlink_to(source.resolve())
PY
MYPYPATH=$tree .venv/bin/mypy -p fedprune 2>&1 |
  sed -E "s#^$tree/fedprune/(coordinator|converters|device_profiles|edge_client|monitor|protocol)/#\1/#; s#^$tree/##"
