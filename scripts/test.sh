#!/usr/bin/env bash
# Set everything up, then run the whole test suite (unit, integration with a real mosquitto, end to end).
# The dashboard's test drives a real browser: Debian's chromium, installed here once if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  echo "test: apt-get install chromium (for the dashboard's browser test)"
  sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
# Two workers: the tests that start brokers and processes run one after another on one of them,
# as they would alone (tests/conftest.py puts them in one xdist group); the others share the
# second. "-n 0" runs everything in this process.
exec .venv/bin/python -m pytest -n 2 --dist loadgroup "$@"
