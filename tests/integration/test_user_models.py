"""A new user's first run with their own Keras model and data: what works, and the one-line
answers for what does not (issue 8). Each model is written here the way a user writes it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tf_keras

from fedprune.coordinator import digits

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BIN = Path(sys.executable).parent


def _functional(kind: str) -> tf_keras.Model:
    """A Functional CNN for 8x8x1 digits: with BatchNormalization, with a residual branch, with a
    LeakyReLU (which the litert trainer does not train), or with logits out."""
    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input((8, 8, 1), name="pixels")
    x = tf_keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = tf_keras.layers.BatchNormalization(name="bn")(x)
    x = tf_keras.layers.Activation("relu")(x)
    if kind == "branch":
        x = tf_keras.layers.Add(name="add")([x, tf_keras.layers.Conv2D(8, 1)(x)])
    if kind == "leaky":
        x = tf_keras.layers.LeakyReLU(name="leaky")(x)
    x = tf_keras.layers.MaxPooling2D()(x)
    x = tf_keras.layers.Flatten()(x)
    x = tf_keras.layers.Dense(32, activation="relu")(x)
    outputs = tf_keras.layers.Dense(
        10, activation=None if kind == "logits" else "softmax", name="out"
    )(x)
    return tf_keras.Model(inputs, outputs, name=f"user-{kind}")


def _coordinator(model: Path, heldout: Path, out: Path, run: str, broker: str) -> list[str]:
    return [
        str(BIN / "fedprune-coordinator"),
        "--broker",
        broker,
        "--run",
        run,
        "--model",
        str(model),
        "--min-clients",
        "2",
        "--rounds",
        "3",
        "--begin-round",
        "1",
        "--end-round",
        "2",
        "--target",
        "0.5",
        "--heldout",
        str(heldout),
        "--out",
        str(out),
        "--join-timeout",
        "60",
    ]


def _device(data: Path, run: str, broker: str, profile: str, tmp: Path) -> list[str]:
    return [
        str(BIN / "fedprune-client"),
        "--broker",
        broker,
        "--run",
        run,
        "--id",
        profile,
        "--data",
        str(data),
        "--profile",
        profile,
        "--models",
        str(tmp / profile),
        "--cache",
        str(tmp / "cache"),
        "--timeout",
        "240",
    ]


@pytest.mark.parametrize("kind", ["batchnorm", "branch"])
def test_a_functional_model_trains_on_litert_and_keras_devices(
    mosquitto: str, tmp_path: Path, kind: str
) -> None:
    # Prepare: the user's Functional model file (with BatchNormalization, and a residual branch),
    # two devices: a Pi (litert) and a PC (keras)
    model = tmp_path / "user.keras"
    _functional(kind).save(model)
    paths, heldout = digits.write_demo_data(tmp_path / "data", 2, alpha=100.0, seed=0)
    coordinator = subprocess.Popen(
        _coordinator(model, heldout, tmp_path / "runs", "functional", mosquitto),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    # Execute
    devices = [
        subprocess.Popen(
            _device(path, "functional", mosquitto, profile, tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for path, profile in zip(paths, ["raspberry-pi-4", "generic-x86-64"], strict=True)
    ]
    logs = [device.communicate(timeout=300)[0] for device in devices]
    out, err = coordinator.communicate(timeout=300)

    # Assert: both trained every round, the run learned, and each device installed its model
    assert coordinator.returncode == 0, err[-3000:]
    assert [d.returncode for d in devices] == [0, 0], "\n".join(log[-2000:] for log in logs)
    rounds = [json.loads(line) for line in (tmp_path / "runs/functional/metrics.jsonl").open()]
    assert [r["reported"] for r in rounds] == [2, 2, 2]
    assert rounds[-1]["accuracy"] >= 0.8
    assert (tmp_path / "raspberry-pi-4" / "raspberry-pi-4" / "model.tflite").is_file()


def test_a_model_litert_cannot_train_is_said_at_start_and_the_litert_device_stops(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: a LeakyReLU, which the litert trainer does not train
    model = tmp_path / "leaky.keras"
    _functional("leaky").save(model)
    paths, heldout = digits.write_demo_data(tmp_path / "data", 2, alpha=100.0, seed=0)
    coordinator = subprocess.Popen(
        _coordinator(model, heldout, tmp_path / "runs", "bn", mosquitto),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    # Execute: the Pi joins first and must be told, not left waiting
    pi = subprocess.run(
        _device(paths[0], "bn", mosquitto, "raspberry-pi-4", tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    coordinator.kill()
    _, err = coordinator.communicate(timeout=60)

    # Assert
    reason = "layer 'leaky' (LeakyReLU) is not supported by the litert trainer"
    assert pi.returncode == 2, pi.stderr[-2000:]
    said = pi.stderr.strip().splitlines()[-1]
    assert said.startswith("fedprune-client: error: this device's trainer (litert) cannot train")
    assert said.endswith(
        f"run 'bn': {reason}; use the keras trainer (trainer = \"keras\" in the device profile)"
    )
    assert f"litert devices cannot train this model: {reason}" in err


def test_a_logits_model_is_refused_at_start_with_one_line(tmp_path: Path) -> None:
    # Prepare
    model = tmp_path / "logits.keras"
    _functional("logits").save(model)

    # Execute: no broker is needed to be told
    done = subprocess.run(
        [
            str(BIN / "fedprune-coordinator"),
            "--model",
            str(model),
            "--broker",
            "mqtt://127.0.0.1:9",
            "--out",
            str(tmp_path / "runs"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    # Assert
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"fedprune-coordinator: error: {model}: the output layer 'out' ends in 'linear', not a"
        " softmax; fedprune trains classifiers that output probabilities: give it"
        " activation='softmax'"
    )


def test_one_hot_labels_on_a_device_are_one_line_saying_integer_labels_are_needed(
    tmp_path: Path,
) -> None:
    # Prepare: labels as Keras examples often keep them
    x, y = digits.load()
    data = tmp_path / "one-hot.npz"
    np.savez(data, x=x[:100], y=np.eye(10, dtype=np.float32)[y[:100]])

    # Execute
    done = subprocess.run(
        [
            str(BIN / "fedprune-client"),
            "--data",
            str(data),
            "--profile",
            "raspberry-pi-4",
            "--broker",
            "mqtt://127.0.0.1:9",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    # Assert
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"fedprune-client: error: {data}: labels of shape (100, 10) look one-hot encoded; fedprune"
        " needs one integer class per sample (for one-hot labels: y = y.argmax(axis=1))"
    ]
