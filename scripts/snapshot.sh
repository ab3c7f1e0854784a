#!/usr/bin/env bash
# A copy of the package as it is at a commit (default HEAD), laid out as it installs (fedprune.*),
# for a long benchmark that must not pick up files edited while it runs:
#     PYTHONPATH=$(scripts/snapshot.sh) .venv/bin/python benchmarks/convergence.py ...
# Prints the folder to put first on PYTHONPATH (Python's path finder comes before the editable
# install's).
set -euo pipefail
cd "$(dirname "$0")/.."
commit=$(git rev-parse "${1:-HEAD}")
out=.cache/snapshot/$commit
if [ ! -d "$out/fedprune" ]; then
  rm -rf "$out.tmp" && mkdir -p "$out.tmp/src"
  git archive "$commit" | tar -x -C "$out.tmp/src"
  .venv/bin/python - "$out.tmp" <<'PY'
import shutil, sys, tomllib
from pathlib import Path

root = Path(sys.argv[1])
mapping = tomllib.loads((root / "src/pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
for package, folder in mapping.items():
    shutil.copytree(root / "src" / folder, root.joinpath(*package.split(".")), dirs_exist_ok=True)
PY
  rm -rf "$out.tmp/src" && mv "$out.tmp" "$out"
fi
echo "$PWD/$out"
