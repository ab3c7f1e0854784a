"""A device as a service: what ``systemctl stop`` (SIGTERM) does to a running client."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedprune.edge_client.topics import Topics
from fedprune.edge_client.transport import MqttTransport
from fedprune.edge_client.wire import Hello, Offline, decode

pytestmark = [pytest.mark.integration]


def _status(watcher: MqttTransport, timeout: float) -> object:
    """The next message on the device's status topic."""
    item = watcher.get(timeout=timeout)
    assert item is not None, "nothing on the device's status topic"
    return decode(item[1]).message


def test_sigterm_makes_a_waiting_device_say_offline_and_exit_0(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: a device waiting for a coordinator that never comes, and a watcher of its status
    data = tmp_path / "local.npz"
    np.savez(data, x=np.zeros((12, 64), np.float32), y=np.arange(12) % 3)
    topics = Topics("service")
    watcher = MqttTransport(mosquitto, client_id="watcher")
    watcher.subscribe(topics.client_status("pi-9"))
    device = subprocess.Popen(
        [sys.executable, "-m", "fedprune.edge_client", "--broker", mosquitto, "--run", "service",
         "--id", "pi-9", "--data", str(data), "--trainer", "litert", "--cache", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert isinstance(_status(watcher, 60), Hello)

        # Execute
        started = time.monotonic()
        device.send_signal(signal.SIGTERM)
        out, _ = device.communicate(timeout=30)
    finally:
        if device.poll() is None:
            device.kill()

    # Assert: a prompt, clean exit that told the broker (and so the coordinator) it went
    assert device.returncode == 0, out[-2000:]
    assert time.monotonic() - started < 10
    assert "stopped (SIGTERM)" in out
    assert isinstance(_status(watcher, 10), Offline)
    watcher.close()
