"""The `edge` extra on its own: a fresh virtual environment with no TensorFlow runs the client."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def test_edge_extra_installs_and_runs_the_client_without_tensorflow(tmp_path: Path) -> None:
    # Prepare: pip install ".[edge]" into a new venv (wheels come from pip's cache or PyPI).
    env_dir = tmp_path / "edge-venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{ROOT}[edge]"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    data = tmp_path / "local.npz"
    np.savez(data, x=np.zeros((10, 64), np.float32), y=np.arange(10) % 3)

    # Execute
    probe = subprocess.run(
        [python, "-c", "import importlib.util as u, edge_client, edge_client.cli;"
         "print(u.find_spec('tensorflow') is None, u.find_spec('ai_edge_litert') is not None)"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    help_ = subprocess.run([env_dir / "bin" / "fedprune-client", "--help"], capture_output=True,
                           text=True, cwd=tmp_path)  # fmt: skip
    run = subprocess.run(
        [env_dir / "bin" / "fedprune-client", "--data", data, "--broker", "mqtt://127.0.0.1:9"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip

    # Assert: no TensorFlow, the CLI answers, and the keras trainer's absence is one clear line.
    assert probe.stdout.split() == ["True", "True"], probe.stderr
    assert help_.returncode == 0 and "--profile" in help_.stdout
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "fedprune-client: error: trainer 'keras' needs tensorflow, which is not installed;"
        " install it or choose another backend"
    ]
