"""A broker that goes away mid-run: clients and coordinator reconnect with backoff and carry on."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedprune.coordinator.broker import EmbeddedBroker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def rounds_done(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def test_run_survives_a_broker_restart(tmp_path: Path) -> None:
    # Prepare: a mosquitto we can kill and restart on the same port (no persistence: retained
    # messages are gone after the restart and must be republished by their owners).
    broker = EmbeddedBroker("mosquitto").start()
    port = broker.port
    command = [
        sys.executable,
        "-m",
        "fedprune.coordinator.demo",
        "--out",
        str(tmp_path),
        "--run",
        "drop",
        "--broker",
        broker.url,
        "--clients",
        "2",
        "--rounds",
        "8",
        "--begin-round",
        "1",
        "--end-round",
        "6",
        "--round-timeout",
        "40",
    ]
    demo = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "drop" / "metrics.jsonl"

    # Execute: once round 2 is done, take the broker away for 3 s, then bring it back.
    try:
        deadline = time.monotonic() + 240
        while rounds_done(metrics) < 2 and time.monotonic() < deadline and demo.poll() is None:
            time.sleep(0.05)
        broker.stop()
        time.sleep(3)
        broker = EmbeddedBroker("mosquitto", port=port).start()
        out, err = demo.communicate(timeout=240)
    finally:
        demo.kill()
        broker.stop()

    # Assert: every round ran; the ones after the restart got both clients' updates again.
    logs = "".join(p.read_text()[-1500:] for p in (tmp_path / "drop" / "logs").glob("*.log"))
    assert demo.returncode == 0, out[-2000:] + err[-2000:] + logs
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in lines] == list(range(1, 9))
    assert lines[-1]["reported"] == 2
    assert sum(r["reported"] for r in lines) >= 14
    assert lines[-1]["sparsity"] == pytest.approx(0.8, abs=0.01)
