"""``fedprune-client`` in-process: every failure is one stderr line and a documented exit code."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fedprune.edge_client.cli import main


@pytest.fixture
def good_data(tmp_path: Path) -> Path:
    path = tmp_path / "kitchen.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.normal(size=(20, 4)), y=rng.integers(0, 3, size=20))
    return path


def _error_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return capsys.readouterr().err.splitlines()


def test_an_unknown_profile_exits_2_naming_it(
    good_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    code = main(["--profile", "toaster-9000", "--data", str(good_data)])

    # Assert
    lines = _error_lines(capsys)
    assert code == 2
    assert len(lines) == 1
    assert lines[0].startswith("fedprune-client: error: unknown device profile 'toaster-9000'")


def test_a_garbled_data_file_exits_2_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    path = tmp_path / "garbled.npz"
    path.write_bytes(b"PK\x03\x04 this is not really a zip archive")

    # Execute
    code = main(["--data", str(path)])

    # Assert
    lines = _error_lines(capsys)
    assert code == 2
    assert len(lines) == 1
    assert lines[0].startswith(f"fedprune-client: error: {path}: ")


def test_an_unreachable_broker_exits_3_naming_it(
    good_data: Path, free_port: int, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare
    broker = f"mqtt://127.0.0.1:{free_port}"
    started = time.monotonic()

    # Execute
    code = main(
        ["--broker", broker, "--connect-attempts", "2", "--data", str(good_data)]
        + ["--trainer", "litert", "-q"]  # runs where TensorFlow is missing too (the ARM run)
    )

    # Assert
    lines = _error_lines(capsys)
    assert code == 3
    assert len(lines) == 1
    assert lines[0].startswith(f"fedprune-client: error: cannot reach the MQTT broker at {broker}")
    assert time.monotonic() - started < 3.0


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_connect_attempts_below_one_is_a_usage_error(
    good_data: Path, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute
    with pytest.raises(SystemExit) as caught:
        main(["--connect-attempts", value, "--data", str(good_data)])

    # Assert
    assert caught.value.code == 2
    assert "argument --connect-attempts:" in capsys.readouterr().err


def test_help_explains_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute
    with pytest.raises(SystemExit) as caught:
        main(["--help"])

    # Assert
    out = capsys.readouterr().out
    assert caught.value.code == 0
    assert out.startswith("usage: fedprune-client")
    for flag in ("--broker", "--data", "--profile", "--connect-attempts", "--timeout"):
        assert flag in out
