#!/usr/bin/env bash
# Build fedprune's release files into dist/: the sdist, then the wheel from the sdist (python -m
# build), so a file missing from either shows up here. Prints the wheel's path last.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
rm -rf dist build
.venv/bin/python -m build --outdir dist . >dist.log 2>&1 || {
  tail -n 30 dist.log >&2
  echo "build: python -m build failed (whole log: dist.log)" >&2
  exit 1
}
rm -f dist.log
ls dist/fedprune-*.tar.gz >&2
ls "$PWD"/dist/fedprune-*-py3-none-any.whl
