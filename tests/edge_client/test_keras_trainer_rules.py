"""The keras trainer's local training rules (protocol 1.13): FedProx's proximal term, against a
hand-written tf_keras loop and against its gradient's formula, and a round's learning rate, which
trains as a trainer built at that rate would without rebuilding the compiled step.

Skipped where tf_keras is not installed (an ARM device's userland).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest

from fedprune.edge_client.keras_trainer import KerasTrainer
from fedprune.edge_client.trainer import batches
from fedprune.protocol.codec import Model
from fedprune.protocol.errors import WireError
from fedprune.protocol.messages import Spec

tf = pytest.importorskip("tensorflow")
tf_keras = pytest.importorskip("tf_keras")

BATCH, LR, MOMENTUM, MU = 16, 0.05, 0.9, 2.0


def _spec(optimizer: str = "sgd", **fields: Any) -> Spec:
    """An MLP with BatchNormalization (its moving statistics are not trainable) and 4 classes."""
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Input((12,)),
            tf_keras.layers.Dense(16, activation="tanh"),
            tf_keras.layers.BatchNormalization(),
            tf_keras.layers.Dense(4, activation="softmax"),
        ]
    )
    spec = Spec(
        model_json=model.to_json(),
        input_shape=[12],
        optimizer=optimizer,
        learning_rate=LR,
        momentum=MOMENTUM,
        local_epochs=1,
        batch_size=BATCH,
    )
    return dataclasses.replace(spec, **fields)


def _start(spec: Spec) -> Model:
    """The round's model: random weights, half of each kernel masked."""
    shapes = [w.shape for w in tf_keras.models.model_from_json(spec.model_json).get_weights()]
    rng = np.random.default_rng(1)
    masks = [(rng.random(s) > 0.5).astype(np.float32) if len(s) == 2 else None for s in shapes]
    weights = [rng.normal(0, 0.5, s).astype(np.float32) for s in shapes]
    weights[5] = np.abs(weights[5]) + np.float32(0.5)  # the moving variance
    return Model(
        weights=[w if m is None else w * m for w, m in zip(weights, masks, strict=True)],
        masks=masks,
    )


def _data(n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    return rng.normal(size=(n, 12)).astype(np.float32), rng.integers(0, 4, n).astype(np.int64)


def _reference(spec: Spec, start: Model, *, mu: float, epochs: int, seed: int) -> list[Any]:
    """The trainable weights after the loss plus ``mu / 2 * ||w - start||^2`` (the trainable
    weights only), taken by tf_keras step by step, the masks applied after each step."""
    model = tf_keras.models.model_from_json(spec.model_json)
    model.set_weights(start.weights)
    variables = model.trainable_variables
    anchors = [tf.constant(v.numpy()) for v in variables]
    index = {id(w): i for i, w in enumerate(model.weights)}
    masks = [start.masks[index[id(v)]] for v in variables]
    masks = [
        tf.ones(v.shape) if m is None else tf.constant(m)
        for v, m in zip(variables, masks, strict=True)
    ]
    if spec.optimizer == "adam":
        optimizer = tf_keras.optimizers.Adam(spec.learning_rate)
    else:
        optimizer = tf_keras.optimizers.SGD(spec.learning_rate, momentum=spec.momentum)
    loss_fn = tf_keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def step(x: Any, y: Any) -> None:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
            loss += (
                mu
                / 2
                * sum(tf.reduce_sum((v - a) ** 2) for v, a in zip(variables, anchors, strict=True))
            )
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        for v, m in zip(variables, masks, strict=True):
            v.assign(v * m)

    x, y = _data()
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        for idx in batches(len(x), BATCH, rng):
            step(x[idx], y[idx])
    return [v.numpy() for v in variables]


def _trainable(spec: Spec, weights: list[np.ndarray]) -> list[np.ndarray]:
    """The trainable ones of a ``get_weights()`` list, as ``model.trainable_variables`` orders."""
    model = tf_keras.models.model_from_json(spec.model_json)
    index = {id(w): i for i, w in enumerate(model.weights)}
    return [weights[index[id(v)]] for v in model.trainable_variables]


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_with_prox_matches_a_hand_written_tf_keras_loop(optimizer: str) -> None:
    # Prepare
    spec = _spec(optimizer, prox_mu=MU)
    start = _start(spec)
    want = _reference(spec, start, mu=MU, epochs=2, seed=5)
    without = _reference(spec, start, mu=0.0, epochs=2, seed=5)

    # Execute
    got = KerasTrainer(spec).fit(start, *_data(), epochs=2, seed=5)

    # Assert
    assert _max_diff(_trainable(spec, got), want) < 1e-6
    assert _max_diff(_trainable(spec, got), without) > 1e-2


def test_the_pull_of_a_step_is_mu_times_the_distance_from_the_round_start() -> None:
    # Prepare: one batch per epoch, so that the second epoch is one step from w1, the weights
    # after the first. Its gradient with the term exceeds the one without by mu * (w1 - start):
    # SGD (its momentum the same in both) moves it lr * mu * (w1 - start) less far.
    plain, prox = _spec(), _spec(prox_mu=MU)
    start = _start(plain)
    x, y = _data(BATCH)
    trainer = KerasTrainer(plain)
    w1 = _trainable(plain, trainer.fit(start, x, y, epochs=1, seed=5))
    w2 = _trainable(plain, trainer.fit(start, x, y, epochs=2, seed=5))

    # Execute
    w2_prox = _trainable(prox, KerasTrainer(prox).fit(start, x, y, epochs=2, seed=5))

    # Assert
    anchor = _trainable(plain, start.weights)
    for a, b, w, at in zip(w2, w2_prox, w1, anchor, strict=True):
        np.testing.assert_allclose(a - b, LR * MU * (w - at), rtol=1e-3, atol=1e-7)
    assert max(float(np.abs(w - at).max()) for w, at in zip(w1, anchor, strict=True)) > 1e-2


def test_a_large_mu_keeps_the_weights_near_the_round_start() -> None:
    # Prepare
    spec = _spec()
    start = _start(spec)
    anchor = np.concatenate([w.ravel() for w in _trainable(spec, start.weights)])

    # Execute: lr * mu = 0.5 (above 1, the pull would overshoot the anchor)
    far, near = (
        np.concatenate(
            [
                w.ravel()
                for w in _trainable(
                    spec, KerasTrainer(_spec(prox_mu=mu)).fit(start, *_data(), epochs=5, seed=5)
                )
            ]
        )
        for mu in (0.0, 10.0)
    )

    # Assert: the trainable weights (the moving statistics are outside the term)
    assert np.linalg.norm(near - anchor) < 0.2 * np.linalg.norm(far - anchor)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_at_a_learning_rate_equals_a_trainer_built_at_it(optimizer: str) -> None:
    # Prepare
    spec = _spec(optimizer)
    start, (x, y) = _start(spec), _data()
    trainer = KerasTrainer(spec)
    at_spec = KerasTrainer(spec).fit(start, x, y, epochs=2, seed=5)
    built_at = KerasTrainer(_spec(optimizer, learning_rate=0.2)).fit(start, x, y, epochs=2, seed=5)

    # Execute: a round at 0.2, then one at the Spec's rate again
    got = trainer.fit(start, x, y, epochs=2, seed=5, learning_rate=0.2)
    back = trainer.fit(start, x, y, epochs=2, seed=5)

    # Assert: the same weights, one compiled step for both rates
    for a, b in zip(got, built_at, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(back, at_spec, strict=True):
        np.testing.assert_array_equal(a, b)
    assert _max_diff(got, at_spec) > 1e-2
    assert trainer._step.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("rate", [-0.1, 0.0, float("nan"), float("inf")])
def test_a_learning_rate_that_is_not_positive_and_finite_fails_the_round(rate: float) -> None:
    trainer = KerasTrainer(_spec())

    with pytest.raises(WireError, match="learning rate must be finite and > 0"):
        trainer.fit(_start(_spec()), *_data(), epochs=1, seed=5, learning_rate=rate)
