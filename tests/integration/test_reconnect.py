"""A broker that goes away mid-run: clients and coordinator reconnect with backoff and carry on,
after a clean stop without persistence (every retained message gone) and after SIGKILL with
persistence on (what the broker last saved comes back)."""

from __future__ import annotations

import getpass
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from processes import demo as demo_command

from fedprune.coordinator.broker import free_port, mosquitto_binary

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def rounds_done(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def _mosquitto(port: int, folder: Path, *, persistence: bool) -> subprocess.Popen[bytes]:
    conf = folder / "mosquitto.conf"
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "max_queued_messages 10000",
        f"user {getpass.getuser()}",
    ]  # stay who we are: the folder is ours
    if persistence:  # saved every second, so a SIGKILL loses at most the last second
        lines += ["persistence true", f"persistence_location {folder}/", "autosave_interval 1"]
    conf.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen(
        [mosquitto_binary() or "mosquitto", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return process


@pytest.mark.parametrize(
    ("stop", "persistence"),
    [(signal.SIGTERM, False), (signal.SIGKILL, True)],
    ids=["stopped-without-persistence", "killed-with-persistence"],
)
def test_run_survives_a_broker_restart(
    tmp_path: Path, stop: signal.Signals, persistence: bool
) -> None:
    # Prepare: a mosquitto we can stop and start again on the same port
    port = free_port()
    broker = _mosquitto(port, tmp_path, persistence=persistence)
    url = f"mqtt://127.0.0.1:{port}"
    command = demo_command(
        url,
        out=tmp_path,
        run="drop",
        clients=2,
        rounds=8,
        begin_round=1,
        end_round=6,
        round_timeout=40,
    )
    demo = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "drop" / "metrics.jsonl"

    # Execute: once round 2 is done, take the broker away for 3 s, then bring it back
    try:
        deadline = time.monotonic() + 240
        while rounds_done(metrics) < 2 and time.monotonic() < deadline and demo.poll() is None:
            time.sleep(0.05)
        broker.send_signal(stop)
        broker.wait(10)
        saved = (tmp_path / "mosquitto.db").exists()
        time.sleep(3)
        broker = _mosquitto(port, tmp_path, persistence=persistence)
        out, err = demo.communicate(timeout=240)
    finally:
        demo.kill()
        broker.kill()
        broker.wait(10)

    # Assert: every round ran; the ones after the restart got both clients' updates again.
    logs = "".join(p.read_text()[-1500:] for p in (tmp_path / "drop" / "logs").glob("*.log"))
    assert demo.returncode == 0, out[-2000:] + err[-2000:] + logs
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in lines] == list(range(1, 9))
    assert saved == persistence
    assert lines[-1]["reported"] == 2
    assert sum(r["reported"] for r in lines) >= 14
    assert lines[-1]["sparsity"] == pytest.approx(0.8, abs=0.01)
