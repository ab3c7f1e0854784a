"""Shared fixtures: a real mosquitto on a free loopback port, started per test that asks for it;
fedprune's wheel, built once per session, and a device's virtual environment made from it with
nothing of the checkout on the path."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def free_port() -> int:
    """A loopback TCP port that nothing listens on, so connecting to it is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def mosquitto() -> Iterator[str]:
    """URL of a private mosquitto broker (scripts/setup.sh installs it; CI has it)."""
    from fedprune.coordinator.broker import EmbeddedBroker, mosquitto_binary

    if mosquitto_binary() is None:
        pytest.fail("mosquitto is not installed: run scripts/setup.sh (apt-get install mosquitto)")
    with EmbeddedBroker("mosquitto") as broker:
        yield broker.url


def clean_env() -> dict[str, str]:
    """This process's environment without anything that would put the checkout on a path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fedprune's wheel: the one CI built (``FEDPRUNE_WHEEL``, scripts/build.sh), else built now
    the same way (``python -m build``: an sdist, then the wheel from the sdist)."""
    if given := os.environ.get("FEDPRUNE_WHEEL"):
        return Path(given).resolve()
    out = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (built,) = out.glob("fedprune-*.whl")
    return built


@pytest.fixture(scope="session")
def edge_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The ``bin`` folder of a fresh virtual environment with ``fedprune[edge,monitor]``
    installed from the wheel, as a device installs it (dependencies from pip's cache or the
    index)."""
    env_dir = tmp_path_factory.mktemp("edge") / "venv"
    venv.create(env_dir, with_pip=True)
    install = subprocess.run(
        [
            env_dir / "bin" / "python",
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            f"{wheel}[edge,monitor]",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=clean_env(),
        cwd=env_dir,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    yield env_dir / "bin"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (scripts/test.sh: ``-n 2 --dist loadgroup``) the tests that start
    brokers and processes (marked ``integration``, and the installed wheel's) run in one group,
    one after another on one worker as they would alone; the others share the second worker."""
    for item in items:
        if item.get_closest_marker("integration") or item.path.name == "test_package.py":
            item.add_marker(pytest.mark.xdist_group("processes"))
