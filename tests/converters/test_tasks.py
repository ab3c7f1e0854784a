"""What a model learns, read from its output (converters/task.py), and the exports of an
autoencoder, verified on its own score: the AUC of its error, or its MSE."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tf_keras

from fedprune.converters.export import export_model
from fedprune.converters.task import task_of
from fedprune.coordinator import models
from fedprune.device_profiles import DeviceProfile, Precision
from fedprune.edge_client import infer
from fedprune.edge_client.task import Task
from fedprune.protocol.errors import ConfigError, ExportError

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
layers = tf_keras.layers


def _dense(inputs: int, outputs: int, activation: str | None) -> tf_keras.Model:
    x = layers.Input((inputs,))
    return tf_keras.Model(x, layers.Dense(outputs, activation=activation, name="out")(x))


@pytest.mark.parametrize(
    ("build", "asked", "expected"),
    [
        (lambda: models.build("autoencoder"), "auto", Task.RECONSTRUCT),
        (lambda: models.build("resnet8"), "auto", Task.CLASSIFY),
        (lambda: _dense(64, 64, "sigmoid"), "auto", Task.RECONSTRUCT),
        (lambda: _dense(10, 10, "softmax"), "auto", Task.CLASSIFY),  # a softmax classifies
        (lambda: _dense(10, 10, "softmax"), "reconstruct", Task.RECONSTRUCT),
    ],
    ids=["autoencoder", "resnet8", "sigmoid-ae", "softmax-same-size", "asked"],
)
def test_the_task_is_read_from_the_output_unless_asked(
    build: Callable[[], tf_keras.Model], asked: str, expected: Task
) -> None:
    assert task_of(build(), asked) is expected


@pytest.mark.parametrize(
    ("model", "asked", "message"),
    [
        (
            _dense(64, 10, "softmax"),
            "reconstruct",
            "model 'm': a reconstruction outputs as many values as its input has (64); the model"
            " outputs (None, 10)",
        ),
        (
            _dense(64, 64, None),
            "classify",
            "model 'm': the output layer 'out' ends in 'linear', not a softmax; fedprune trains"
            " classifiers that output probabilities (give it activation='softmax') and"
            " autoencoders whose output has the input's size",
        ),
    ],
    ids=["reconstruct-wrong-size", "classify-without-softmax"],
)
def test_a_task_the_model_cannot_learn_is_refused_with_one_line(
    model: tf_keras.Model, asked: str, message: str
) -> None:
    model._name = "m"

    with pytest.raises(ConfigError) as caught:
        task_of(model, asked)

    assert str(caught.value) == message


@pytest.fixture(scope="module")
def autoencoder(digits: Digits) -> tf_keras.Model:
    """The preset trained centrally on the normal digits 0-4 (Adam, 30 epochs)."""
    x, y = digits[0], digits[1]
    normal = x[y < 5]
    model = models.build("autoencoder", seed=0)
    model.compile(tf_keras.optimizers.Adam(0.01), "mse")
    model.fit(normal, normal.reshape(len(normal), -1), epochs=30, batch_size=32, verbose=0)
    return model


@pytest.mark.parametrize("precision", [Precision.FLOAT32, Precision.DYNAMIC_INT8])
def test_an_autoencoder_export_is_verified_on_the_auc_of_its_error(
    tmp_path: Path,
    digits: Digits,
    autoencoder: tf_keras.Model,
    make_profile: Callable[..., DeviceProfile],
    precision: Precision,
) -> None:
    # Prepare: held-out digits labelled 1 (an anomaly: 5-9) or 0
    x, y = digits[2], (digits[3] >= 5).astype(np.int64)

    # Execute
    report = export_model(
        autoencoder, make_profile(precision=precision), x=x, y=y, out_dir=tmp_path
    )

    # Assert: scored as the coordinator scores it, and said so in export.json
    assert report.task == "reconstruct" and report.tflite_accuracy is None
    assert report.keras_auc is not None and report.tflite_auc is not None
    assert report.keras_auc > 0.85 and abs(report.tflite_auc - report.keras_auc) < 0.02
    assert report.tflite_score == report.tflite_auc
    saved = json.loads((tmp_path / "export.json").read_text())
    assert saved["tflite_auc"] == report.tflite_auc and saved["tflite_mse"] == report.tflite_mse
    assert report.scores().startswith(f"LiteRT AUC {report.tflite_auc:.4f}")


def test_an_autoencoder_export_without_anomaly_labels_is_held_to_its_mse(
    tmp_path: Path,
    digits: Digits,
    autoencoder: tf_keras.Model,
    make_profile: Callable[..., DeviceProfile],
) -> None:
    # Prepare: every held-out sample normal; a tolerance no export can meet (MSE halved)
    x, y = digits[2], np.zeros(len(digits[2]), np.int64)
    profile = make_profile(precision=Precision.DYNAMIC_INT8)

    # Execute
    report = export_model(autoencoder, profile, x=x, y=y, out_dir=tmp_path / "kept")
    with pytest.raises(ExportError) as caught:
        export_model(
            autoencoder, profile, x=x, y=y, out_dir=tmp_path / "refused", max_accuracy_drop=-0.5
        )

    # Assert
    assert report.tflite_auc is None and report.tflite_score is None
    assert report.keras_mse is not None and report.tflite_mse is not None
    assert report.tflite_mse <= report.keras_mse * 1.02
    assert str(caught.value).startswith(
        f"profile {profile.name}: LiteRT MSE {report.tflite_mse:.4g} is above"
    )
    assert "max_accuracy_drop -0.5 of it) on 450 samples; nothing written" in str(caught.value)
    assert not (tmp_path / "refused").exists()


def test_fedprune_infer_gives_an_autoencoder_export_its_reconstruction_errors(
    tmp_path: Path,
    digits: Digits,
    autoencoder: tf_keras.Model,
    make_profile: Callable[..., DeviceProfile],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Prepare: the export, and a device's unlabelled samples
    x, y = digits[2], (digits[3] >= 5).astype(np.int64)
    report = export_model(
        autoencoder, make_profile(precision=Precision.DYNAMIC_INT8), x=x, y=y, out_dir=tmp_path
    )
    samples = tmp_path / "samples.npz"
    np.savez(samples, x=x[:20])

    # Execute
    code = infer.main([str(tmp_path), "--data", str(samples), "--runs", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    text = infer.main([str(tmp_path), "--data", str(samples), "--runs", "3"])
    lines = capsys.readouterr().out.splitlines()

    # Assert: each sample's error, their mean, no accuracy from an argmax of pixels
    want = np.mean((autoencoder.predict(x[:20], verbose=0) - x[:20].reshape(20, -1)) ** 2)
    assert code == text == 0
    assert out["accuracy"] is None and out["mse"] == pytest.approx(float(want), rel=0.05)
    assert out["export"]["task"] == "reconstruct" and out["export"]["auc"] == report.tflite_auc
    assert any(line.startswith("MSE       ") for line in lines)
    assert any(line.startswith("error     ") for line in lines)
    assert not any(line.startswith("accuracy") for line in lines)
