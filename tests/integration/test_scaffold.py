"""A SCAFFOLD run for real: mosquitto, the ``fedprune-coordinator`` process with ``--scaffold``
and ``fedprune-client`` processes on skewed data, every update accepted with its control change,
each device's control variate in its cache, and the coordinator's c their mean.

Real parts only. The devices train with the keras trainer: a litert device needs the run's
artifact built for SCAFFOLD (``build_trainable(scaffold=True)``), which the coordinator builds
once ``coordinator/session.py`` passes ``scaffold`` to it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from processes import coordinator, start_device

from fedprune.coordinator.digits import write_demo_data

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUNDS = 4
TRAINERS = ("litert", "litert", "keras")
RUN = "scaffold"


def _device_flags(i: int, trainer: str, cache: Path) -> tuple[str, ...]:
    return ("--seed", str(i), "--trainer", trainer, "--cache", str(cache), "--no-deploy")


def test_a_scaffold_run_takes_every_update_and_each_device_keeps_its_control_variate(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: skewed shares of the digits (Dirichlet 0.5), one device each
    shares, heldout = write_demo_data(tmp_path / "data", len(TRAINERS), alpha=0.5, seed=0)
    caches = [tmp_path / f"cache-{i}" for i in range(len(TRAINERS))]
    devices = [
        start_device(
            mosquitto,
            RUN,
            f"dev-{i}",
            share,
            *_device_flags(i, trainer, caches[i]),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, (trainer, share) in enumerate(zip(TRAINERS, shares, strict=True))
    ]

    # Execute
    try:
        done = subprocess.run(
            coordinator(
                mosquitto,
                "--scaffold",
                run=RUN,
                out=tmp_path / "runs",
                heldout=heldout,
                model="mlp",
                rounds=ROUNDS,
                begin_round=2,
                end_round=3,
                target=0.5,
                min_clients=len(TRAINERS),
                round_timeout=60,
                install_wait=0,
            ),
            capture_output=True,
            text=True,
            timeout=300,
        )
        logs = [d.communicate(timeout=60)[0] for d in devices]
    finally:
        for device in devices:
            if device.poll() is None:
                device.kill()
                device.communicate()

    # Assert: every round took every device's update, none rejected
    assert done.returncode == 0, done.stderr[-3000:] + "\n".join(log[-1500:] for log in logs)
    run_dir = tmp_path / "runs" / RUN
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert all(r["reported"] == len(TRAINERS) and r["rejected"] == {} for r in rounds), rounds
    for number in range(1, ROUNDS + 1):
        report = json.loads((run_dir / "rounds" / f"round-{number:04d}.json").read_text())
        assert report["rejected"] == {}
    assert rounds[-1]["accuracy"] >= 0.85  # measured: 0.94
    assert rounds[-1]["sparsity"] == pytest.approx(0.5, abs=0.01)

    # Assert: each device's c_i in its cache, of the model's shapes, zero where it prunes; the
    # coordinator's c (its checkpoint) is their mean, as every device took part in every round
    (checkpoint,) = (run_dir / "checkpoints").glob("round-*.npz")
    with np.load(checkpoint) as saved:
        c = [saved[f"control_c{i:03d}"] for i in range(6)]
        weights = [saved[f"w{i:03d}"] for i in range(sum(n[0] == "w" for n in saved.files))]
    variates = []
    for i, cache in enumerate(caches):
        with np.load(cache / f"control-dev-{i}.npz", allow_pickle=False) as kept:
            assert str(kept["key"]).startswith(f"{RUN}/")
            variates.append([kept[f"c{j:03d}"] for j in range(len(kept.files) - 1)])
    assert [v.shape for v in variates[0]] == [w.shape for w in c]
    mean = [np.mean(parts, axis=0) for parts in zip(*variates, strict=True)]
    for got, want in zip(mean, c, strict=True):  # measured: 3e-10 apart, c reaching 1e-2
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-7)
    assert min(float(np.abs(a).max()) for a in c) > 1e-3
    assert np.mean(c[0] == 0) >= 0.45  # zero where the first kernel is pruned (50%)
    assert np.mean(weights[0] == 0) >= 0.45
