"""Two ``fedprune-aggregator`` processes split a run's updates through mosquitto's shared
subscription, and the coordinator adds their partial sums: the same run as without them."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from processes import QUIET_TF, aggregator, coordinator, start_device

from fedprune.coordinator.digits import write_demo_data
from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUNDS = 6


def _run(mosquitto: str, tmp_path: Path, out: str, aggregators: int) -> tuple[Path, list[str]]:
    """A run of 3 litert devices (Pi 4 profile: 1 MiB messages, so an update is one message);
    its run directory and the aggregators' logs."""
    paths, heldout = write_demo_data(tmp_path / "data", 3, alpha=0.5, seed=0)
    run = f"share-{aggregators}"
    helpers = [
        subprocess.Popen(
            aggregator(mosquitto, run=run, id=f"agg-{k}", max_payload=2**20),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=QUIET_TF,
        )
        for k in range(aggregators)
    ]
    devices = [
        start_device(
            mosquitto,
            run,
            f"pi-{i}",
            path,
            "--seed",
            str(i),
            "--profile",
            "raspberry-pi-4",
            "--cache",
            str(tmp_path / f"cache-{i}"),
            "--no-deploy",
        )
        for i, path in enumerate(paths)
    ]
    try:
        argv = coordinator(
            mosquitto,
            run=run,
            out=tmp_path / out,
            heldout=heldout,
            rounds=ROUNDS,
            begin_round=2,
            end_round=5,
            min_clients=3,
            round_timeout=60,
            install_wait=0,
            profile="raspberry-pi-4",
            max_payload=2**20,
            aggregators=aggregators,
        )
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=QUIET_TF)
        assert done.returncode == 0, done.stderr[-3000:]
        logs = [helper.communicate(timeout=60)[0] for helper in helpers]
    finally:
        for process in [*helpers, *devices]:
            if process.poll() is None:
                process.kill()
    return tmp_path / out / run, logs


def _metrics(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_aggregators_split_the_updates_and_the_run_ends_as_without_them(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: an independent subscriber counts the update bytes the broker delivers
    counter = MqttTransport(mosquitto, client_id="byte-counter")
    counter.subscribe(Topics("share-2").all_updates)

    # Execute: the run with two aggregators, and the same run without
    shared, logs = _run(mosquitto, tmp_path, "shared", 2)
    alone, _ = _run(mosquitto, tmp_path, "alone", 0)
    counted = 0
    while (item := counter.get(timeout=0.5)) is not None:
        counted += len(item[1])
    counter.close()

    # Assert: every update counted once, each aggregator took a share, and the model is the same
    # up to the order of float additions
    rounds, reference = _metrics(shared), _metrics(alone)
    assert [(r["reported"], r["rejected"]) for r in rounds] == [(3, {})] * ROUNDS
    assert sum(int(r["bytes_up"]) for r in rounds) == counted  # type: ignore[call-overload]
    taken = [int(log.rsplit("round(s), ", 1)[1].split()[0]) for log in logs]
    assert sum(taken) == 3 * ROUNDS and min(taken) > 0, logs
    assert [r["sparsity"] for r in rounds] == pytest.approx([r["sparsity"] for r in reference])
    assert rounds[-1]["accuracy"] == pytest.approx(reference[-1]["accuracy"], abs=0.005)
