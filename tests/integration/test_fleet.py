"""A simulated fleet in one round (benchmarks/fleet.py) through a real mosquitto: every signed
update is counted exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLEET = Path(__file__).resolve().parents[2] / "benchmarks" / "fleet.py"


def test_a_fleet_of_200_signed_devices_is_counted_exactly_once(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: 200 devices in 2 worker processes, each sending a distinct signed dense update.
    out = tmp_path / "fleet.json"
    command = [
        sys.executable,
        str(FLEET),
        "--devices",
        "200",
        "--updates",
        "dense",
        "--workers",
        "2",
        "--broker",
        mosquitto,
        "--no-deadline",
        "--json",
        str(out),
    ]

    # Execute
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)

    # Assert: every update reported once, none rejected, and the coordinator counted exactly the
    # bytes the devices published.
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["selected"] == run["reported"] == 200
    assert run["rejected"] == {}
    assert run["bytes_up"] == run["bytes_sent"] > 200 * 500_000
