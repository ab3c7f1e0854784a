"""The keras trainer's local training rules (protocol 1.13): FedProx's proximal term, against a
hand-written tf_keras loop and against its gradient's formula, and a round's learning rate, which
trains as a trainer built at that rate would without rebuilding the compiled step.

Skipped where tf_keras is not installed (an ARM device's userland).
"""

from __future__ import annotations

import keras_loop as loop
import numpy as np
import pytest
from keras_loop import BATCH, LR

from fedprune.edge_client.keras_trainer import KerasTrainer
from fedprune.protocol.errors import WireError

tf = pytest.importorskip("tensorflow")
tf_keras = pytest.importorskip("tf_keras")

MU = 2.0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fit_with_prox_matches_a_hand_written_tf_keras_loop(optimizer: str) -> None:
    # Prepare
    spec = loop.spec(optimizer, prox_mu=MU)
    start = loop.start(spec)
    want = loop.reference(spec, start, mu=MU, epochs=2, seed=5).trainable
    without = loop.reference(spec, start, mu=0.0, epochs=2, seed=5).trainable

    # Execute
    got = KerasTrainer(spec).fit(start, *loop.data(), epochs=2, seed=5)

    # Assert
    assert loop.max_diff(loop.trainable(spec, got), want) < 1e-6
    assert loop.max_diff(loop.trainable(spec, got), without) > 1e-2


def test_the_pull_of_a_step_is_mu_times_the_distance_from_the_round_start() -> None:
    # Prepare: one batch per epoch, so that the second epoch is one step from w1, the weights
    # after the first. Its gradient with the term exceeds the one without by mu * (w1 - start):
    # SGD (its momentum the same in both) moves it lr * mu * (w1 - start) less far.
    plain, prox = loop.spec(), loop.spec(prox_mu=MU)
    start = loop.start(plain)
    x, y = loop.data(BATCH)
    trainer = KerasTrainer(plain)
    w1 = loop.trainable(plain, trainer.fit(start, x, y, epochs=1, seed=5))
    w2 = loop.trainable(plain, trainer.fit(start, x, y, epochs=2, seed=5))

    # Execute
    w2_prox = loop.trainable(prox, KerasTrainer(prox).fit(start, x, y, epochs=2, seed=5))

    # Assert
    anchor = loop.trainable(plain, start.weights)
    for a, b, w, at in zip(w2, w2_prox, w1, anchor, strict=True):
        np.testing.assert_allclose(a - b, LR * MU * (w - at), rtol=1e-3, atol=1e-7)
    assert max(float(np.abs(w - at).max()) for w, at in zip(w1, anchor, strict=True)) > 1e-2


def test_a_large_mu_keeps_the_weights_near_the_round_start() -> None:
    # Prepare
    spec = loop.spec()
    start = loop.start(spec)
    anchor = np.concatenate([w.ravel() for w in loop.trainable(spec, start.weights)])

    # Execute: lr * mu = 0.5 (above 1, the pull would overshoot the anchor)
    far, near = (
        np.concatenate(
            [
                w.ravel()
                for w in loop.trainable(
                    spec,
                    KerasTrainer(loop.spec(prox_mu=mu)).fit(start, *loop.data(), epochs=5, seed=5),
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
    spec = loop.spec(optimizer)
    start, (x, y) = loop.start(spec), loop.data()
    trainer = KerasTrainer(spec)
    at_spec = KerasTrainer(spec).fit(start, x, y, epochs=2, seed=5)
    built_at = KerasTrainer(loop.spec(optimizer, learning_rate=0.2)).fit(
        start, x, y, epochs=2, seed=5
    )

    # Execute: a round at 0.2, then one at the Spec's rate again
    got = trainer.fit(start, x, y, epochs=2, seed=5, learning_rate=0.2)
    back = trainer.fit(start, x, y, epochs=2, seed=5)

    # Assert: the same weights, one compiled step for both rates
    for a, b in zip(got, built_at, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(back, at_spec, strict=True):
        np.testing.assert_array_equal(a, b)
    assert loop.max_diff(got, at_spec) > 1e-2
    assert trainer._step.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("rate", [-0.1, 0.0, float("nan"), float("inf")])
def test_a_learning_rate_that_is_not_positive_and_finite_fails_the_round(rate: float) -> None:
    trainer = KerasTrainer(loop.spec())

    with pytest.raises(WireError, match="learning rate must be finite and > 0"):
        trainer.fit(loop.start(loop.spec()), *loop.data(), epochs=1, seed=5, learning_rate=rate)
