"""``fedprune-client`` in-process: every failure is one stderr line and a documented exit code."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fedprune.edge_client.cli import main, parse
from fedprune.protocol.signing import new_keypair, seal


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


def test_an_unsigned_device_needs_insecure_for_a_broker_elsewhere(
    good_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Execute: a broker on another machine (never reached: the check comes first)
    started = time.monotonic()
    code = main(
        ["--broker", "mqtt://192.0.2.7:1883", "--data", str(good_data), "-q"]
        + ["--trainer", "litert"]  # runs where TensorFlow is missing too (the ARM run)
    )

    # Assert: one line naming the risk, the way out and the docs
    lines = _error_lines(capsys)
    assert code == 2 and len(lines) == 1
    assert (
        "the run is unsigned and the broker mqtt://192.0.2.7:1883 is not on this machine"
        in (lines[0])
    )
    assert "Deploying securely" in lines[0] and "--insecure" in lines[0]
    assert time.monotonic() - started < 3.0


def test_a_sealed_signing_key_needs_its_passphrase(
    good_data: Path,
    free_port: int,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: the device's key sealed with a passphrase (fedprune-provision seal)
    key, coordinator = tmp_path / "signing.key", tmp_path / "coordinator.pub"
    new_keypair(key, tmp_path / "device.pub")
    new_keypair(tmp_path / "c.key", coordinator)
    seal(key, {"FEDPRUNE_KEY_PASSPHRASE": "long enough"})
    argv = ["--broker", f"mqtt://127.0.0.1:{free_port}", "--connect-attempts", "1"]
    argv += ["--signing-key", str(key), "--coordinator-key", str(coordinator)]
    argv += ["--data", str(good_data), "--trainer", "litert", "-q"]
    monkeypatch.delenv("FEDPRUNE_KEY_PASSPHRASE", raising=False)
    monkeypatch.delenv("FEDPRUNE_KEY_PASSPHRASE_FILE", raising=False)

    # Execute: without the passphrase, then with it (then the broker is what is missing)
    without = main(argv)
    refused = _error_lines(capsys)
    monkeypatch.setenv("FEDPRUNE_KEY_PASSPHRASE", "long enough")
    opened = main(argv)

    # Assert
    assert without == 2 and len(refused) == 1
    assert "the signing key is sealed" in refused[0]
    assert opened == 3
    assert "cannot reach the MQTT broker" in _error_lines(capsys)[0]


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


def test_a_device_config_file_sets_the_options_and_flags_override_it(tmp_path: Path) -> None:
    # Prepare: a provisioned device's config, paths relative to it
    config = tmp_path / "pi-1" / "device.toml"
    config.parent.mkdir()
    config.write_text(
        'broker = "mqtts://broker.lan:8883"\nca = "ca.crt"\ncredentials = "credentials.toml"\n'
        'id = "pi-1"\nrun = "kitchen"\ndata = "local.npz"\n'
    )

    # Execute
    args = parse(["--config", str(config), "--run", "garage"])

    # Assert
    assert (args.broker, args.client_id, args.run) == ("mqtts://broker.lan:8883", "pi-1", "garage")
    assert (args.ca, args.credentials) == (
        str(config.parent / "ca.crt"),
        str(config.parent / "credentials.toml"),
    )
    assert args.data == config.parent / "local.npz"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('brokr = "mqtt://b"\n', "unknown key 'brokr' (known: broker, ca, cert, key,"),
        ("id = 7\n", "id must be a non-empty string, got 7"),
        ("not toml", "not a readable TOML config file"),
    ],
)
def test_a_bad_device_config_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    # Prepare
    config = tmp_path / "device.toml"
    config.write_text(text)

    # Execute
    code = main(["--config", str(config), "--data", "x.npz"])

    # Assert
    assert code == 2
    (line,) = _error_lines(capsys)
    assert line.startswith(f"fedprune-client: error: {config}: {message}")
