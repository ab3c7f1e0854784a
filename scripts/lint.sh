#!/usr/bin/env bash
# Formatting, lint and types in one command (run after scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/mypy --strict edge_client device_profiles converters coordinator
