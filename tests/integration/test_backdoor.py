"""A backdoor in the last round over mosquitto (issue 22): one device whose valid account claims
10,000,000 samples sends, in the run's last round, an update that erases two classes. The overall
accuracy stays well above chance, so only the per-class gate can tell: the model must not be
deployed, and the run must say which classes fell. (Norm bounding would shrink this update; it
is off here, so that the gate is tested on its own: test_secure_fleet.py tests the defaults.)"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from processes import demo
from stolen_device import StolenDevice

from fedprune.protocol.codec import Model

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN = "backdoor"
ROUNDS = 6
ERASED = (2, 3)


def erase(round_: int, model: Model) -> tuple[list[np.ndarray], int]:
    """Empty updates worth one sample until the last round, then one that pushes the output
    layer's bias of the ERASED classes far down, claiming every sample its hello declared."""
    deltas = [np.zeros_like(w) for w in model.weights]
    if round_ < ROUNDS:
        return deltas, 1  # no weight, nothing to see
    for c in ERASED:
        deltas[-1][c] = -100.0  # the output layer's bias: never predicted again
    return deltas, 10_000_000  # it outweighs everyone


def test_a_last_round_backdoor_is_not_deployed_and_the_run_names_the_erased_classes(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: the backdoor joins before the coordinator starts, beside two honest devices
    backdoor = StolenDevice(
        mosquitto, run=RUN, client_id="backdoor", rounds=ROUNDS, declared=10_000_000, craft=erase
    )
    backdoor.start()
    # ...on an open broker with FedAvg, and no norm bound: the gate is the last line, tested alone
    command = demo(
        mosquitto,
        out=tmp_path,
        run=RUN,
        clients=2,
        rounds=ROUNDS,
        begin_round=1,
        end_round=4,
        clip_multiple=0,
    )

    # Execute
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    backdoor.stop.set()
    backdoor.join(10)

    # Assert: the erased classes are gone from the final model while its accuracy stays far
    # above chance; the gate stops the deployment and names them; nothing is deployed
    assert backdoor.answered == list(range(1, ROUNDS + 1))
    rounds = [
        json.loads(line) for line in (tmp_path / RUN / "metrics.jsonl").read_text().splitlines()
    ]
    last = rounds[-1]
    assert [last["recall"][c] for c in ERASED] == [0.0, 0.0]
    assert last["accuracy"] > 0.5
    summary = json.loads((tmp_path / RUN / "summary.json").read_text())
    assert summary["deployed"] == []
    assert summary["unhealthy"].startswith("the final model misses classes its best round")
    assert all(f" {c} (" in summary["unhealthy"] for c in ERASED)
    assert done.returncode == 1, done.stderr[-3000:]
