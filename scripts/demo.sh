#!/usr/bin/env bash
# Set everything up, then run the whole job on this machine: fedprune-demo (extra flags are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/fedprune-demo "$@"
