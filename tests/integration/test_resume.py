"""A coordinator killed with SIGKILL and resumed: the same schedule, the same accuracy.

Real parts only: mosquitto, the ``fedprune-coordinator`` process, three ``fedprune-client``
processes (litert trainer) that keep running across the crash and rejoin the resumed run.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from processes import coordinator, litert, start_device

from fedprune.coordinator.digits import write_demo_data

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROUNDS = 8
CLIENTS = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path]:
    return write_demo_data(tmp_path_factory.mktemp("data"), CLIENTS, alpha=0.5, seed=0)


def _coordinator(mosquitto: str, out: Path, heldout: Path, *extra: str) -> list[str]:
    return coordinator(
        mosquitto,
        *extra,
        out=out,
        heldout=heldout,
        model="mlp",
        rounds=ROUNDS,
        begin_round=2,
        end_round=6,
        min_clients=CLIENTS,
        round_timeout=60,
        install_wait=0,
        profile="raspberry-pi-4",
    )


@pytest.fixture
def devices(
    mosquitto: str, data: tuple[list[Path], Path], tmp_path: Path
) -> Iterator[list[subprocess.Popen[str]]]:
    """Three devices of run ``crash`` that stay up across coordinator restarts."""
    processes = [
        start_device(
            mosquitto,
            "crash",
            f"pi-{i}",
            path,
            *litert(i, tmp_path),
            "--forever",
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, path in enumerate(data[0])
    ]
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.communicate()


def _metrics(run_dir: Path) -> list[dict[str, object]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize(
    ("pruning", "kill_after"),
    [
        ((), 3),
        (("--units", "l1", "--target", "0.5", "--rebuild-every", "2"), 5),
        (("--server-optimizer", "adam", "--lr-schedule", "cosine", "--keep", "best"), 4),
    ],
    ids=["weights", "units-rebuilt-at-4", "server-adam-cosine-best"],
)
def test_a_coordinator_killed_mid_run_and_resumed_ends_as_the_uninterrupted_run(
    mosquitto: str,
    data: tuple[list[Path], Path],
    devices: list[subprocess.Popen[str]],
    tmp_path: Path,
    pruning: tuple[str, ...],
    kill_after: int,
) -> None:
    # Prepare: the uninterrupted run of the same config, its own run name and devices' run apart
    heldout = data[1]
    baseline = subprocess.run(
        [*_coordinator(mosquitto, tmp_path / "base", heldout, "--run", "crash", *pruning)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert baseline.returncode == 0, baseline.stdout[-2000:] + baseline.stderr[-3000:]
    expected = _metrics(tmp_path / "base" / "crash")

    # Execute: the same run again, SIGKILLed once round 3 is checkpointed (so mid-round 4; a
    # unit-pruned run once round 5 is, after its model was rebuilt at round 4), then resumed
    # with nothing but the run directory
    run_dir = tmp_path / "runs" / "crash"
    first = subprocess.Popen(
        _coordinator(mosquitto, tmp_path / "runs", heldout, "--run", "crash", *pruning),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    end = time.monotonic() + 300
    while len(_metrics(run_dir)) < kill_after and first.poll() is None and time.monotonic() < end:
        time.sleep(0.02)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    killed_after = len(_metrics(run_dir))
    resumed = subprocess.run(
        coordinator(mosquitto, resume=run_dir),
        capture_output=True,
        text=True,
        timeout=600,
    )

    # Assert: killed mid-run, resumed where the checkpoint was, and ended like the baseline
    assert kill_after <= killed_after < ROUNDS
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resuming after round" in resumed.stderr
    got = _metrics(run_dir)
    assert [r["round"] for r in got] == list(range(1, ROUNDS + 1))
    assert [r["sparsity"] for r in got] == pytest.approx([r["sparsity"] for r in expected])
    assert [r["parameters"] for r in got] == [r["parameters"] for r in expected]
    assert [r["reported"] for r in got] == [CLIENTS] * ROUNDS, resumed.stderr[-6000:]
    assert abs(got[-1]["accuracy"] - expected[-1]["accuracy"]) <= 0.005  # type: ignore[operator]
    assert got[-1]["loss"] == pytest.approx(expected[-1]["loss"], rel=0.02)
    assert len(list((run_dir / "checkpoints").glob("round-*.npz"))) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    base_summary = json.loads((tmp_path / "base" / "crash" / "summary.json").read_text())
    assert summary["kept_round"] == base_summary["kept_round"]  # --keep best: the same round
    assert summary["bytes_down"] >= sum(r["bytes_down"] for r in got)  # the whole run's
    report = json.loads((run_dir / "rounds" / f"round-{ROUNDS:04d}.json").read_text())
    assert report == {
        "round": ROUNDS,
        "late": [],
        "stale": [],
        "gone": [],
        "rejected": {},
        "capped": [],
        "left_out": [],
    }
    assert (run_dir / "export" / "raspberry-pi-4" / "model.tflite").is_file()
    assert all(device.poll() is None for device in devices)  # they stayed up and rejoined
