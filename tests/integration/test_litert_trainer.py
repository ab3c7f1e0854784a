"""The litert trainer against the keras trainer: same round, same data and seed, same update; and
federated runs with litert clients, keras clients and a mix of both."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import tf_keras
from processes import demo

from fedprune.converters.trainable import build_trainable
from fedprune.coordinator import digits, models
from fedprune.edge_client.keras_trainer import KerasTrainer
from fedprune.edge_client.litert_trainer import LiteRTTrainer
from fedprune.edge_client.trainer import batches
from fedprune.protocol.codec import Model
from fedprune.protocol.messages import Spec

pytestmark = pytest.mark.integration

# Largest |keras - litert| difference in any weight after 2 epochs from the same start (float32
# arithmetic in a different order; measured about 1e-6 to 1e-5).
TOLERANCE = 1e-4


@pytest.mark.parametrize("preset", ["mlp", "cnn"])
def test_one_round_gives_the_same_update_with_both_trainers(preset: str) -> None:
    # Prepare: an 80%-masked model and 200 digits
    keras_model = models.build(preset, seed=1)
    spec = Spec(
        model_json=keras_model.to_json(),
        input_shape=list(keras_model.input_shape[1:]),
        optimizer="sgd",
        learning_rate=0.05,
        momentum=0.9,
        local_epochs=2,
        batch_size=32,
    )
    rng = np.random.default_rng(0)
    weights = keras_model.get_weights()
    masks = [
        None if w.ndim == 1 else (rng.random(w.shape) > 0.8).astype(np.float32) for w in weights
    ]
    start = Model(
        weights=[w if m is None else w * m for w, m in zip(weights, masks, strict=True)],
        masks=masks,
    )
    x, y = digits.load()
    x, y = x[:200].reshape((-1, *spec.input_shape)), y[:200]
    artifact = build_trainable(
        keras_model, batch_size=32, optimizer="sgd", learning_rate=0.05, momentum=0.9
    )

    # Execute
    heard: dict[str, list[int]] = {"keras": [], "litert": []}
    litert = LiteRTTrainer(spec, artifact=artifact)
    by_keras = KerasTrainer(spec).fit(start, x, y, epochs=2, seed=7, on_epoch=heard["keras"].append)
    by_litert = litert.fit(start, x, y, epochs=2, seed=7, on_epoch=heard["litert"].append)

    # Assert: the same weights, the same zeros, and training did move them
    for ke, li, m, w in zip(by_keras, by_litert, masks, start.weights, strict=True):
        assert np.max(np.abs(ke - li)) < TOLERANCE
        assert np.max(np.abs(ke - w)) > 100 * TOLERANCE
        if m is not None:
            assert np.all(li[m == 0] == 0.0) and np.all(ke[m == 0] == 0.0)
    assert heard == {"keras": [1, 2], "litert": [1, 2]}


def _normed(conv: bool) -> tf_keras.Model:
    """Dense -> BatchNormalization (tf_keras's plain kernel), or Conv2D -> BatchNormalization
    (its fused kernel, whose moving variance follows the Bessel-corrected batch variance)."""
    layers = tf_keras.layers
    tf_keras.utils.set_random_seed(3)
    inputs = layers.Input((8, 8, 1))
    x = layers.Conv2D(4, 3)(inputs) if conv else layers.Dense(4)(layers.Flatten()(inputs))
    x = layers.Flatten()(layers.BatchNormalization(momentum=0.99)(x))
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x))


@pytest.mark.parametrize("conv", [False, True], ids=["dense", "conv-fused"])
def test_both_trainers_set_the_moving_statistics_to_the_average_of_their_batches(
    conv: bool,
) -> None:
    # Prepare: no epoch, so what the statistics pass sees is the start model's
    model = _normed(conv)
    spec = Spec(
        model_json=model.to_json(),
        input_shape=[8, 8, 1],
        optimizer="sgd",
        learning_rate=0.05,
        momentum=0.0,
        local_epochs=1,
        batch_size=32,
    )
    x, y = digits.load()
    x, y = x[:100].reshape((-1, 8, 8, 1)), y[:100]  # 4 batches, the last topped up
    start = Model(weights=model.get_weights(), masks=[None] * len(model.weights))
    artifact = build_trainable(model, batch_size=32, optimizer="sgd", learning_rate=0.05)
    norm = next(la for la in model.layers if isinstance(la, tf_keras.layers.BatchNormalization))
    features = tf_keras.Model(model.inputs, norm.input)  # what it normalizes
    means, variances = [], []
    for idx in batches(len(x), 32, np.random.default_rng(5)):
        h = np.asarray(features(x[idx]), np.float64).reshape(-1, 4)
        means.append(h.mean(axis=0))
        variances.append(h.var(axis=0, ddof=1 if conv else 0))

    # Execute
    by_keras = KerasTrainer(spec).fit(start, x, y, epochs=0, seed=5)
    by_litert = LiteRTTrainer(spec, artifact=artifact).fit(start, x, y, epochs=0, seed=5)

    # Assert: the moving mean and variance are the batches' average; nothing else moved
    index = {id(w): i for i, w in enumerate(model.weights)}
    mean, variance = index[id(norm.moving_mean)], index[id(norm.moving_variance)]
    for weights in (by_keras, by_litert):
        np.testing.assert_allclose(weights[mean], np.mean(means, axis=0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(weights[variance], np.mean(variances, axis=0), rtol=1e-5)
        for i, (w, w0) in enumerate(zip(weights, start.weights, strict=True)):
            if i not in (mean, variance):
                np.testing.assert_array_equal(w, w0)


def _spec(model: tf_keras.Model) -> Spec:
    return Spec(
        model_json=model.to_json(),
        input_shape=[8, 8, 1],
        optimizer="sgd",
        learning_rate=0.05,
        momentum=0.9,
        local_epochs=1,
        batch_size=32,
    )


def test_the_keras_statistics_pass_leaves_the_next_round_as_a_fresh_trainer_would() -> None:
    """The pass sets momentum and Dropout's rate to 0 for its calls: they are restored, and the
    compiled step keeps tf_keras's momentum."""
    x, y = digits.load()
    x, y = x[:64].reshape((-1, 8, 8, 1)), y[:64]
    model = models.build("resnet8", seed=2)  # BatchNormalization, no Dropout (random)
    start = Model(weights=model.get_weights(), masks=[None] * len(model.weights))
    trainer = KerasTrainer(_spec(model))
    dropping = KerasTrainer(_spec(models.build("dscnn", seed=2)))

    trainer.fit(start, x, y, epochs=1, seed=1)
    again = trainer.fit(start, x, y, epochs=1, seed=1)
    fresh = KerasTrainer(_spec(model)).fit(start, x, y, epochs=1, seed=1)
    dscnn = dropping.model.get_weights()
    dropping.fit(Model(weights=dscnn, masks=[None] * len(dscnn)), x, y, epochs=1, seed=1)

    for a, b in zip(again, fresh, strict=True):
        np.testing.assert_array_equal(a, b)
    found = [*trainer.model.layers, *dropping.model.layers]
    norms = [la for la in found if isinstance(la, tf_keras.layers.BatchNormalization)]
    assert {la.momentum for la in norms} == {0.99}
    assert [la.rate for la in found if isinstance(la, tf_keras.layers.Dropout)] == [0.2, 0.4]


def _demo(tmp_path: Path, run: str, profiles: str) -> dict[str, float]:
    # The same codec whatever the profiles: only the trainers differ.
    command = demo(
        "mosquitto", out=tmp_path, run=run, clients=4, client_profiles=profiles, codec="int8"
    )
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    last: dict[str, float] = json.loads(
        (tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1]
    )
    return last


@pytest.mark.slow
def test_litert_keras_and_mixed_fleets_reach_the_same_accuracy(tmp_path: Path) -> None:
    keras = _demo(tmp_path, "keras", "generic-x86-64")
    litert = _demo(tmp_path, "litert", "raspberry-pi-4")
    mixed = _demo(tmp_path, "mixed", "raspberry-pi-4,generic-x86-64")

    assert keras["accuracy"] >= 0.93 and keras["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert abs(litert["accuracy"] - keras["accuracy"]) <= 0.01
    assert abs(mixed["accuracy"] - keras["accuracy"]) <= 0.01
    assert litert["reported"] == mixed["reported"] == 4
    # The litert clients never imported TensorFlow; the keras ones did.
    logs = {
        run: (tmp_path / run / "logs" / "client-1.log").read_text() for run in ("litert", "mixed")
    }
    assert "TensorFlow loaded: no" in logs["litert"]
    assert "TensorFlow loaded: yes" in logs["mixed"]  # client-1 of the mix is generic-x86-64
