"""A device as a service: the systemd unit's command, and what ``systemctl stop`` (SIGTERM) does."""

from __future__ import annotations

import configparser
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from processes import start_device

from fedprune.edge_client.cli import main
from fedprune.protocol.envelope import decode
from fedprune.protocol.messages import Hello, Offline
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import MqttTransport

pytestmark = [pytest.mark.integration]


def _status(watcher: MqttTransport, timeout: float) -> object:
    """The next message on the device's status topic."""
    item = watcher.get(timeout=timeout)
    assert item is not None, "nothing on the device's status topic"
    return decode(item[1]).message


def test_the_systemd_units_command_serves_the_device_and_sigterm_makes_it_say_offline_and_exit_0(
    mosquitto: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Prepare: a device config, the unit fedprune-client writes for it, and a watcher of the
    # device's status
    data = tmp_path / "local.npz"
    np.savez(data, x=np.zeros((12, 64), np.float32), y=np.arange(12) % 3)
    config = tmp_path / "device.toml"
    config.write_text(
        f'broker = "{mosquitto}"\nrun = "service"\nid = "pi-9"\ndata = "local.npz"\n'
        f'trainer = "litert"\ncache = "cache"\n'
    )
    assert main(["--systemd-unit", "--config", str(config)]) == 0
    unit = tmp_path / "fedprune-client.service"
    unit.write_text(capsys.readouterr().out)
    if shutil.which("systemd-analyze"):
        verified = subprocess.run(
            ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
        )
        assert verified.returncode == 0, verified.stderr
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read_string(unit.read_text())
    command = shlex.split(service["Service"]["ExecStart"])
    topics = Topics("service")
    watcher = MqttTransport(mosquitto, client_id="watcher")
    watcher.subscribe(topics.client_status("pi-9"))
    device = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )
    try:
        assert isinstance(_status(watcher, 60), Hello)
        time.sleep(1.5)  # its loop says what it waits for within 0.5 s

        # Execute
        started = time.monotonic()
        device.send_signal(signal.SIGTERM)
        out, _ = device.communicate(timeout=30)
    finally:
        if device.poll() is None:
            device.kill()

    # Assert: it served forever from its config (waiting for the coordinator), then left promptly
    # and cleanly, telling the broker (and so the coordinator) it went
    assert command[-1] == "--forever"
    assert service["Service"]["KillSignal"] == "SIGTERM"
    assert device.returncode == 0, out[-2000:]
    assert time.monotonic() - started < 10
    assert "waiting for the coordinator of run 'service'" in out
    assert "stopped (SIGTERM)" in out
    assert isinstance(_status(watcher, 10), Offline)
    watcher.close()


def test_ctrl_c_makes_a_waiting_device_say_offline_and_exit_130_without_a_traceback(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: a device waiting for a coordinator that never comes, and a watcher of its status
    data = tmp_path / "local.npz"
    np.savez(data, x=np.zeros((12, 64), np.float32), y=np.arange(12) % 3)
    watcher = MqttTransport(mosquitto, client_id="watcher")
    watcher.subscribe(Topics("ctrl-c").client_status("pi-c"))
    device = start_device(
        mosquitto,
        "ctrl-c",
        "pi-c",
        data,
        "--trainer",
        "litert",
        "--forever",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert isinstance(_status(watcher, 60), Hello)
        time.sleep(1.5)  # inside its loop's wait for a message

        # Execute
        started = time.monotonic()
        device.send_signal(signal.SIGINT)
        out, _ = device.communicate(timeout=30)
    finally:
        if device.poll() is None:
            device.kill()

    # Assert: it left promptly, said so and told the broker, as after SIGTERM
    assert device.returncode == 130, out[-2000:]
    assert time.monotonic() - started < 10
    assert "stopped (SIGINT)" in out and "Traceback" not in out
    assert isinstance(_status(watcher, 10), Offline)
    watcher.close()
