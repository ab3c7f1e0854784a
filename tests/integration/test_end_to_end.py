"""The main job for real: mosquitto, the coordinator, client processes and a TFLite export."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedprune.protocol.topics import Topics
from fedprune.protocol.transport import MqttTransport

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run_demo(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fedprune.coordinator.demo", "--out", str(tmp_path), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def metrics(run_dir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_federated_pruning_run_over_mosquitto_reaches_accuracy_and_sparsity(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: a separate subscriber counts every update payload byte the broker delivers.
    run = "e2e"
    counter = MqttTransport(mosquitto, client_id="byte-counter")
    counter.subscribe(Topics(run).all_updates)

    # Execute: coordinator here-and-now plus 3 client processes, 80% target sparsity.
    done = run_demo(tmp_path, "--broker", mosquitto, "--clients", "3", "--run", run)
    counted = 0
    while (item := counter.get(timeout=0.5)) is not None:
        counted += len(item[1])
    counter.close()

    # Assert
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / run
    rounds = metrics(run_dir)
    last = rounds[-1]
    assert last["accuracy"] >= 0.90
    assert last["sparsity"] >= 0.75
    assert all(r["reported"] == 3 and r["rejected"] == {} for r in rounds)
    assert sum(r["bytes_up"] for r in rounds) == counted
    assert last["bytes_up"] < 0.3 * last["dense_bytes_up"]
    export = json.loads((run_dir / "export" / "generic-x86-64" / "export.json").read_text())
    assert abs(export["tflite_accuracy"] - export["keras_accuracy"]) <= 0.01
    assert export["tflite_accuracy"] >= 0.89
    for name in ("config.toml", "model/wrapped.keras", "model/stripped.keras"):
        assert (run_dir / name).is_file(), name
    assert len(list((run_dir / "checkpoints").glob("round-*.npz"))) == 1
    assert "LiteRT accuracy" in done.stdout
    # Every byte the devices received, by their own count, is what the coordinator says it sent
    # them (models to the selected, messages, artifact, deployment); a status message that
    # crosses a device's joining may be counted once too few or too many.
    received = [
        int(re.search(r"(\d+) bytes received", path.read_text())[1])  # type: ignore[index]
        for path in sorted((run_dir / "logs").glob("client-*.log"))
    ]
    claimed = json.loads((run_dir / "summary.json").read_text())["bytes_down"]
    assert len(received) == 3
    assert abs(claimed - sum(received)) <= 0.01 * sum(received), (claimed, received)


def test_each_device_receives_and_runs_the_model_exported_for_its_profile(
    mosquitto: str, tmp_path: Path
) -> None:
    # Execute: three clients, each announcing another device profile
    profiles = ["raspberry-pi-4", "raspberry-pi-zero-2w", "jetson-nano"]
    done = run_demo(
        tmp_path,
        "--broker",
        mosquitto,
        "--clients",
        "3",
        "--run",
        "deploy",
        "--rounds",
        "12",
        "--end-round",
        "8",
        "--client-profiles",
        ",".join(profiles),
    )

    # Assert: every device installed the export of its own profile, byte for byte, and it runs
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "deploy"
    precisions = set()
    for i, profile in enumerate(profiles):
        exported = run_dir / "export" / profile
        installed = run_dir / "devices" / f"client-{i}" / profile
        assert (installed / "model.tflite").read_bytes() == (exported / "model.tflite").read_bytes()
        meta = json.loads((installed / "export.json").read_text())
        assert meta["profile"] == profile
        precisions.add(meta["precision"])
        infer = subprocess.run(
            [
                sys.executable,
                "-m",
                "fedprune.edge_client.infer",
                str(installed),
                "--data",
                str(run_dir / "heldout.npz"),
                "--json",
                "--runs",
                "5",
            ],
            capture_output=True,
            text=True,
        )
        assert infer.returncode == 0, infer.stderr
        assert json.loads(infer.stdout)["accuracy"] >= meta["keras_accuracy"] - 0.02
    assert precisions == {"dynamic_int8", "full_int8", "float16"}


def test_demo_runs_with_the_embedded_pure_python_broker(tmp_path: Path) -> None:
    done = run_demo(
        tmp_path,
        "--broker",
        "amqtt",
        "--clients",
        "2",
        "--run",
        "amqtt",
        "--rounds",
        "4",
        "--begin-round",
        "1",
        "--end-round",
        "3",
        "--target",
        "0.5",
    )

    assert done.returncode == 0, done.stderr[-3000:]
    assert "embedded amqtt" in done.stdout
    last = metrics(tmp_path / "amqtt")[-1]
    assert last["reported"] == 2
    assert last["sparsity"] == pytest.approx(0.5, abs=0.01)


def test_twenty_real_device_processes_all_report_every_round_exactly_once(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: an independent subscriber counts the update bytes the broker delivers
    run = "twenty"
    counter = MqttTransport(mosquitto, client_id="byte-counter")
    counter.subscribe(Topics(run).all_updates)

    # Execute: 20 fedprune-client processes (litert: a Pi 4 and a Pi Zero profile in turn)
    done = run_demo(
        tmp_path,
        "--broker",
        mosquitto,
        "--clients",
        "20",
        "--run",
        run,
        "--rounds",
        "8",
        "--begin-round",
        "2",
        "--end-round",
        "6",
        "--client-profiles",
        "raspberry-pi-4,raspberry-pi-zero-2w",
    )
    counted = 0
    while (item := counter.get(timeout=0.5)) is not None:
        counted += len(item[1])
    counter.close()

    # Assert: every device in every round, nothing rejected or lost, the bytes all accounted for
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = metrics(tmp_path / run)
    assert [(r["selected"], r["reported"], r["rejected"]) for r in rounds] == [(20, 20, {})] * 8
    assert sum(r["bytes_up"] for r in rounds) == counted
    assert rounds[-1]["accuracy"] >= 0.5  # 5x chance: ~60 samples a device, a few steps a round


def test_a_run_in_one_top_k_codec_both_ways_counts_every_byte(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: an independent subscriber counts the update bytes the broker delivers
    run = "codec"
    counter = MqttTransport(mosquitto, client_id="byte-counter")
    counter.subscribe(Topics(run).all_updates)

    # Execute: updates and model changes in int8 top-10% with zstandard
    done = run_demo(
        tmp_path,
        "--broker",
        mosquitto,
        "--clients",
        "3",
        "--run",
        run,
        "--rounds",
        "10",
        "--begin-round",
        "0",
        "--end-round",
        "5",
        "--codec",
        "int8+top0.1+zstd",
        "--downlink",
        "codec",
    )
    counted = 0
    while (item := counter.get(timeout=0.5)) is not None:
        counted += len(item[1])
    counter.close()

    # Assert: every update in the codec, every model change used, every byte accounted for
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / run
    rounds = metrics(run_dir)
    assert [r["codecs"] for r in rounds] == [{"int8+top0.1+zstd": 3}] * 10
    assert sum(r["bytes_up"] for r in rounds) == counted
    assert rounds[-1]["bytes_up"] * 50 < rounds[-1]["dense_bytes_up"]
    assert rounds[-1]["accuracy"] >= 0.8  # type: ignore[operator]
    logs = [path.read_text() for path in sorted((run_dir / "logs").glob("client-*.log"))]
    assert not any("change cannot be used" in log for log in logs)
    received = sum(int(re.search(r"(\d+) bytes received", log)[1]) for log in logs)  # type: ignore[index]
    claimed = json.loads((run_dir / "summary.json").read_text())["bytes_down"]
    assert abs(claimed - received) <= 0.01 * received, (claimed, received)


def test_a_unit_pruned_run_rebuilds_the_model_smaller_and_the_devices_switch(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: an independent subscriber counts the update bytes the broker delivers
    run = "units"
    counter = MqttTransport(mosquitto, client_id="byte-counter")
    counter.subscribe(Topics(run).all_updates)

    # Execute: three quarters of the cnn's filters and units go by round 4, rebuilt at 3 and 4
    done = run_demo(
        tmp_path,
        "--broker",
        mosquitto,
        "--clients",
        "3",
        "--run",
        run,
        "--rounds",
        "8",
        "--units",
        "l2",
        "--target",
        "0.75",
        "--begin-round",
        "1",
        "--end-round",
        "4",
        "--rebuild-every",
        "2",
    )
    counted = 0
    while (item := counter.get(timeout=0.5)) is not None:
        counted += len(item[1])
    counter.close()

    # Assert: every device trained every round on whichever model was current
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / run
    rounds = metrics(run_dir)
    # TF-MOT's polynomial share at round 3 is 0.722: 4 of 16 filters and 36 of 128 units stay
    at_3 = 3 * 3 * 1 * 4 + 4 + 256 * 36 + 36 + 36 * 10 + 10
    small = 3 * 3 * 1 * 4 + 4 + 256 * 32 + 32 + 32 * 10 + 10  # 4 filters, 32 units
    assert [r["parameters"] for r in rounds] == [132_650] * 2 + [at_3] + [small] * 5
    assert all(r["reported"] == 3 and r["rejected"] == {} for r in rounds)
    assert sum(r["bytes_up"] for r in rounds) == counted
    assert rounds[-1]["bytes_up"] < 0.1 * rounds[-1]["dense_bytes_up"]  # the unpruned model's
    assert rounds[-1]["accuracy"] >= 0.85
    logs = [path.read_text() for path in sorted((run_dir / "logs").glob("client-*.log"))]
    assert not any("Traceback" in log or "cannot be decoded" in log for log in logs)
    received = sum(int(re.search(r"(\d+) bytes received", log)[1]) for log in logs)  # type: ignore[index]
    claimed = json.loads((run_dir / "summary.json").read_text())["bytes_down"]
    assert abs(claimed - received) <= 0.01 * received, (claimed, received)
    # The export is the small dense model, in the default LiteRT interpreter
    export = json.loads((run_dir / "export" / "generic-x86-64" / "export.json").read_text())
    assert export["tflite_accuracy"] >= 0.85
    assert not export["sparse_format"]
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(
        model_path=str(run_dir / "export" / "generic-x86-64" / "model.tflite")
    )
    interpreter.allocate_tensors()
    shapes = [tuple(d["shape"]) for d in interpreter.get_tensor_details()]
    assert (32, 256) in shapes and (4, 3, 3, 1) in shapes  # TFLite's kernels: out first
