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


def _inverted_residual() -> tf_keras.Model:
    """A user's MobileNetV2-style model: two inverted residual blocks (1x1 expansion, depthwise
    3x3, ReLU6, linear 1x1 projection, added to the block's input), global average pooling."""
    layers = tf_keras.layers
    tf_keras.utils.set_random_seed(0)
    x = inputs = tf_keras.Input((8, 8, 1))
    x = layers.ReLU(6.0)(layers.BatchNormalization()(layers.Conv2D(16, 3, padding="same")(x)))
    for _ in range(2):
        y = layers.ReLU(6.0)(layers.BatchNormalization()(layers.Conv2D(48, 1)(x)))
        y = layers.DepthwiseConv2D(3, padding="same")(y)
        y = layers.ReLU(6.0)(layers.BatchNormalization()(y))
        x = layers.Add()([x, layers.BatchNormalization()(layers.Conv2D(16, 1)(y))])
    x = layers.GlobalAveragePooling2D()(x)
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x), name="user-mobile")


def _coordinator(
    model: Path, heldout: Path, out: Path, run: str, broker: str, *flags: str, rounds: int = 3
) -> list[str]:
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
        str(rounds),
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
        *flags,
    ]


def _device(data: Path, run: str, broker: str, profile: str, tmp: Path, id_: str = "") -> list[str]:
    return [
        str(BIN / "fedprune-client"),
        "--broker",
        broker,
        "--run",
        run,
        "--id",
        id_ or profile,
        "--data",
        str(data),
        "--profile",
        profile,
        "--models",
        str(tmp / (id_ or profile)),
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


def test_a_residual_depthwise_model_is_unit_pruned_and_rebuilt_mid_run_on_litert_devices(
    mosquitto: str, tmp_path: Path
) -> None:
    # Prepare: the user's model file, half its channels to go by round 2 (coupled across the
    # Adds and through the depthwise convolutions), two Pis (litert, no TensorFlow)
    model = tmp_path / "mobile.keras"
    _inverted_residual().save(model)
    dense = _inverted_residual().count_params()
    paths, heldout = digits.write_demo_data(tmp_path / "data", 2, alpha=100.0, seed=0)
    coordinator = subprocess.Popen(
        _coordinator(
            model, heldout, tmp_path / "runs", "mobile", mosquitto, "--units", "l2", rounds=5
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    # Execute
    devices = [
        subprocess.Popen(
            _device(path, "mobile", mosquitto, "raspberry-pi-4", tmp_path, f"pi-{i}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, path in enumerate(paths)
    ]
    logs = [device.communicate(timeout=300)[0] for device in devices]
    out, err = coordinator.communicate(timeout=300)

    # Assert: rebuilt after round 2 with half the channels, both devices trained every round on
    # whichever model was current, the run learned and each Pi installed the small model
    assert coordinator.returncode == 0, err[-3000:]
    assert [d.returncode for d in devices] == [0, 0], "\n".join(log[-2000:] for log in logs)
    rounds = [json.loads(line) for line in (tmp_path / "runs/mobile/metrics.jsonl").open()]
    assert [(r["reported"], r["rejected"]) for r in rounds] == [(2, {})] * 5
    parameters = [r["parameters"] for r in rounds]
    assert parameters[0] == dense and parameters[1] == parameters[-1] < dense / 2
    # with tf_keras's BatchNormalization momentum of 0.99: 0.10 before the devices set their
    # moving statistics at the end of each round (trainer.calibrated), 0.96 after
    assert rounds[-1]["accuracy"] >= 0.9
    for i in range(2):
        assert (tmp_path / f"pi-{i}" / "raspberry-pi-4" / "model.tflite").is_file()


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
        " softmax; fedprune trains classifiers that output probabilities (give it"
        " activation='softmax') and autoencoders whose output has the input's size"
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
