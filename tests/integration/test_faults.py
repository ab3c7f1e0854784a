"""Faults with a defined outcome, on the real parts: a device killed mid-round that reboots.

(The coordinator killed and resumed: test_resume.py; the broker restarted: test_reconnect.py;
chunks lost, out of order or twice, the same update twice, an update of the previous round: the
unit tests of coordinator/rounds.py and edge_client/wire.py.)
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from processes import coordinator as coordinator_command
from processes import litert, start_device

from fedprune.coordinator.digits import write_demo_data

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUNDS = 10


def _device(mosquitto: str, i: int, data: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    return start_device(mosquitto, "faults", f"pi-{i}", data, *litert(i, tmp_path))


def _metrics(run_dir: Path) -> list[dict[str, object]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_a_device_killed_mid_round_is_not_waited_for_and_rejoins_when_it_reboots(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: a coordinator whose rounds each take a while (5 local epochs of the CNN), and three
    # devices
    paths, heldout = write_demo_data(tmp_path / "data", 3, alpha=0.5, seed=0)
    run_dir = tmp_path / "runs" / "faults"
    argv = coordinator_command(
        mosquitto,
        run="faults",
        out=tmp_path / "runs",
        heldout=heldout,
        rounds=ROUNDS,
        begin_round=1,
        end_round=6,
        local_epochs=5,
        min_clients=3,
        round_timeout=120,
        install_wait=0,
    )
    coordinator = subprocess.Popen(
        argv,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    devices = [_device(mosquitto, i, path, tmp_path) for i, path in enumerate(paths)]
    try:
        # Execute: once round 1 is in, kill pi-2 outright (the power cut of a Pi), then boot it
        end = time.monotonic() + 300
        while not _metrics(run_dir) and coordinator.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        devices[2].send_signal(signal.SIGKILL)
        devices[2].wait()
        killed_in = len(_metrics(run_dir)) + 1
        devices[2] = _device(mosquitto, 2, paths[2], tmp_path)
        _, err = coordinator.communicate(timeout=600)
    finally:
        for process in [coordinator, *devices]:
            if process.poll() is None:
                process.kill()

    # Assert: the run ended; no round waited for its 120 s deadline; the round pi-2 died in
    # names it as gone (or it had answered), and after its reboot it reports again
    assert coordinator.returncode == 0, err[-3000:]
    rounds = _metrics(run_dir)
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(float(r["seconds"]) < 60 for r in rounds)  # type: ignore[arg-type]
    report = json.loads((run_dir / "rounds" / f"round-{killed_in:04d}.json").read_text())
    assert report["late"] == [] and report["rejected"] == {}
    assert rounds[-1]["reported"] == 3, [r["reported"] for r in rounds]
    assert "client pi-2 went offline" in err
