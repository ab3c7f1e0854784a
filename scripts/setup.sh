#!/usr/bin/env bash
# Set up fedprune on a fresh Debian/Ubuntu machine: mosquitto from apt, then .venv with the pinned stack.
# Idempotent: re-running only installs what is missing. Used by scripts/demo.sh, scripts/test.sh, .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo_if_needed() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

packages=()
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || packages+=(mosquitto)
python3 -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
if [ ${#packages[@]} -gt 0 ]; then
  echo "setup: apt-get install ${packages[*]}"
  sudo_if_needed apt-get update -qq
  sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
stamp=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.fedprune-setup 2>/dev/null)" != "$stamp" ]; then
  echo "setup: installing Python packages into .venv (about 1.8 GB, once)"
  "${pip[@]}" --upgrade pip
  # tensorflow-cpu first: tf-keras declares a dependency on the full 570 MB CUDA 'tensorflow' wheel,
  # so it and TF-MOT are installed afterwards without dependencies (measured: a 1.8 GB venv
  # instead of 2.4 GB with the same results; pip check then complains, cosmetically).
  "${pip[@]}" -e ".[dev]"
  "${pip[@]}" --no-deps "tf-keras==2.21.0" "tensorflow-model-optimization==0.8.1"
  echo "$stamp" > .venv/.fedprune-setup
fi
