"""An autoencoder learns to reconstruct its input on devices without TensorFlow, and the
coordinator scores it by the AUC of its error on held-out anomalies (edge_client/task.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tf_keras
from processes import demo

from fedprune.converters.trainable import build_trainable
from fedprune.coordinator import digits
from fedprune.edge_client.keras_trainer import KerasTrainer
from fedprune.edge_client.litert_trainer import LiteRTTrainer
from fedprune.edge_client.task import Task
from fedprune.protocol.codec import Model
from fedprune.protocol.messages import Spec

pytestmark = pytest.mark.integration

TOLERANCE = 1e-4  # as tests/integration/test_litert_trainer.py: float32 in another order


def _autoencoder() -> tf_keras.Model:
    layers = tf_keras.layers
    tf_keras.utils.set_random_seed(4)
    inputs = layers.Input((8, 8, 1))
    x = layers.Dense(16, activation="relu")(layers.Flatten()(inputs))
    return tf_keras.Model(inputs, layers.Dense(64, activation="sigmoid")(x))


def test_one_round_of_a_reconstruction_gives_the_same_update_with_both_trainers() -> None:
    # Prepare: an 80%-masked autoencoder, 200 digits, their labels of no use to it
    model = _autoencoder()
    spec = Spec(
        model_json=model.to_json(),
        input_shape=[8, 8, 1],
        optimizer="adam",
        learning_rate=0.01,
        momentum=0.0,
        local_epochs=2,
        batch_size=32,
        task="reconstruct",
    )
    rng = np.random.default_rng(0)
    masks = [
        None if w.ndim == 1 else (rng.random(w.shape) > 0.8).astype(np.float32)
        for w in model.get_weights()
    ]
    start = Model(
        weights=[
            w if m is None else w * m for w, m in zip(model.get_weights(), masks, strict=True)
        ],
        masks=masks,
    )
    x, y = digits.load()
    x, y = x[:200], y[:200]
    artifact = build_trainable(
        model, batch_size=32, optimizer="adam", learning_rate=0.01, task=Task.RECONSTRUCT
    )

    # Execute
    keras, litert = KerasTrainer(spec), LiteRTTrainer(spec, artifact=artifact)
    by_keras = keras.fit(start, x, y, epochs=2, seed=7)
    by_litert = litert.fit(start, x, y, epochs=2, seed=7)
    before = litert.evaluate(start.weights, x, y)
    scores = keras.evaluate(by_keras, x, y), litert.evaluate(by_litert, x, y)

    # Assert: the same weights, trained toward the input (the MSE fell), scored alike
    for ke, li, w in zip(by_keras, by_litert, start.weights, strict=True):
        assert np.max(np.abs(ke - li)) < TOLERANCE
        assert np.max(np.abs(ke - w)) > 100 * TOLERANCE
    assert scores[0].loss == pytest.approx(scores[1].loss, rel=1e-4)
    assert scores[1].loss < 0.8 * before.loss
    assert scores[0].accuracy is None and scores[1].accuracy is None


@pytest.mark.slow
def test_the_autoencoder_preset_finds_anomalies_after_training_on_litert_devices(
    tmp_path: Path,
) -> None:
    """Three litert devices through mosquitto, each with its profile's codec (f16, and int8 with
    top-k and error feedback, which carried BatchNormalization statistics wrongly until they
    travelled exactly), pruned to 80% of the weights."""
    # Execute
    command = demo(
        "mosquitto",
        out=tmp_path,
        run="ae",
        model="autoencoder",
        clients=3,
        client_profiles="raspberry-pi-4,raspberry-pi-zero-2w",
        optimizer="adam",
        lr=0.01,
        rounds=15,
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)

    # Assert: every round reconstructed (no NaN), the final model tells anomalies apart
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = [json.loads(line) for line in (tmp_path / "ae/metrics.jsonl").read_text().splitlines()]
    last = rounds[-1]
    assert all(r["accuracy"] is None and np.isfinite(r["loss"]) for r in rounds)
    assert len({codec for r in rounds for codec in r["codecs"]}) >= 2
    assert last["auc"] >= 0.85 and last["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert (
        "AUC " in done.stdout and "held-out MSE" in (tmp_path / "ae/logs/client-0.log").read_text()
    )
    export = json.loads((tmp_path / "ae/export/raspberry-pi-4/export.json").read_text())
    assert export["task"] == "reconstruct" and abs(export["tflite_auc"] - last["auc"]) <= 0.02
    config = (tmp_path / "ae/config.toml").read_text()
    assert 'task = "reconstruct"' in config
    held_out = np.load(tmp_path / "ae/heldout.npz")
    assert set(np.unique(held_out["y"])) == {0, 1}


def test_a_users_convolutional_autoencoder_trains_on_litert_devices_whatever_their_labels(
    tmp_path: Path,
) -> None:
    """A user's file, not a preset: an 8x8x1 image out of an 8x8x1 image (one output channel),
    while the devices' digits are labelled 0-4: labels play no part in a reconstruction (they
    were checked against the output's one "class" and every device refused the run)."""
    # Prepare
    layers = tf_keras.layers
    tf_keras.utils.set_random_seed(5)
    inputs = layers.Input((8, 8, 1))
    x = layers.BatchNormalization()(layers.Conv2D(8, 3, padding="same", activation="relu")(inputs))
    x = layers.Conv2D(4, 3, padding="same", activation="relu")(x)
    outputs = layers.Conv2D(1, 3, padding="same", activation="sigmoid")(x)
    path = tmp_path / "conv-ae.keras"
    tf_keras.Model(inputs, outputs).save(path)

    # Execute
    command = demo(
        "mosquitto",
        out=tmp_path,
        run="conv",
        model=str(path),
        clients=2,
        client_profiles="raspberry-pi-4",
        optimizer="adam",
        lr=0.01,
        rounds=6,
        begin_round=1,
        end_round=4,
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)

    # Assert: every round took both devices' updates, and the reconstruction got better
    assert done.returncode == 0, done.stderr[-3000:]
    rounds = [
        json.loads(line) for line in (tmp_path / "conv/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["reported"] for r in rounds] == [2] * 6
    assert rounds[-1]["loss"] < 0.7 * rounds[0]["loss"] and rounds[-1]["auc"] is not None
