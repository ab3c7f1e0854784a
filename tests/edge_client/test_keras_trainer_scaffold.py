"""The keras trainer's SCAFFOLD steps (protocol 1.13) against a hand-written tf_keras loop: each
gradient plus the correction it is given, and the mean of the raw gradients over the steps of the
last fit, round after round without retracing its compiled step.

Skipped where tf_keras is not installed (an ARM device's userland).
"""

from __future__ import annotations

import keras_loop as loop
import numpy as np
import pytest

from fedprune.edge_client.keras_trainer import KerasTrainer
from fedprune.protocol.codec import Model

tf_keras = pytest.importorskip("tf_keras")

EPOCHS, SEED = 2, 5
# Measured: 0 (weights) and <= 3e-8 (mean gradients); a correction 1% off moves the weights by
# 1.2e-2.
PARITY = 1e-6


def _correction(start: Model, seed: int) -> list[np.ndarray]:
    """A correction of the size of the gradients, zero where the round's model prunes (as
    LocalTraining gives it), for every weight: the trainer must leave out those it does not
    train."""
    rng = np.random.default_rng(seed)
    return [
        (rng.normal(0, 0.3, w.shape) * (1 if m is None else m)).astype(np.float32)
        for w, m in zip(start.weights, start.masks, strict=True)
    ]


def _untrained() -> list[int]:
    """The indices of the weights no optimizer trains (BatchNormalization's moving statistics)."""
    model = tf_keras.models.model_from_json(loop.spec().model_json)
    trained = {id(v) for v in model.trainable_variables}
    return [i for i, w in enumerate(model.weights) if id(w) not in trained]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_corrected_steps_and_their_mean_gradient_match_a_hand_written_tf_keras_loop(
    optimizer: str,
) -> None:
    # Prepare
    spec = loop.spec(optimizer, scaffold=True)
    start = loop.start(spec)
    correction = _correction(start, seed=3)
    want = loop.reference(spec, start, mu=0.0, epochs=EPOCHS, seed=SEED, correction=correction)
    plain = loop.reference(spec, start, mu=0.0, epochs=EPOCHS, seed=SEED)
    trainer = KerasTrainer(spec)

    # Execute
    got = trainer.fit(start, *loop.data(), epochs=EPOCHS, seed=SEED, correction=correction)
    gradient = trainer.mean_gradient()

    # Assert: the corrected steps, far from the plain ones; the raw gradients' mean, zeros for
    # the moving statistics
    assert loop.max_diff(loop.trainable(spec, got), want.trainable) < PARITY
    assert loop.max_diff(loop.trainable(spec, got), plain.trainable) > 1e-2
    assert loop.max_diff(gradient, want.gradient) < PARITY
    assert [g.shape for g in gradient] == [w.shape for w in start.weights]
    untrained = _untrained()
    assert untrained == [4, 5]
    assert all(not np.any(gradient[i]) for i in untrained)
    assert min(float(np.abs(g).max()) for g in loop.trainable(spec, gradient)) > 1e-3


def test_each_fit_takes_its_own_correction_and_sums_its_own_gradients_in_one_trace() -> None:
    # Prepare: a trainer that trained a round with one correction, and a fresh one
    spec = loop.spec(scaffold=True)
    start = loop.start(spec)
    first, second = _correction(start, seed=3), _correction(start, seed=4)
    used, fresh = KerasTrainer(spec), KerasTrainer(spec)
    used.fit(start, *loop.data(), epochs=EPOCHS, seed=SEED, correction=first)

    # Execute: the next round with another correction (then one with none: zeros)
    got = used.fit(start, *loop.data(), epochs=1, seed=SEED, correction=second)
    got_gradient = used.mean_gradient()
    want = fresh.fit(start, *loop.data(), epochs=1, seed=SEED, correction=second)
    uncorrected = used.fit(start, *loop.data(), epochs=1, seed=SEED)

    # Assert
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(got_gradient, fresh.mean_gradient(), strict=True):
        np.testing.assert_array_equal(a, b)
    plain = loop.reference(spec, start, mu=0.0, epochs=1, seed=SEED)
    assert loop.max_diff(loop.trainable(spec, uncorrected), plain.trainable) < PARITY
    assert used._step.experimental_get_tracing_count() == 1


def test_a_trainer_of_a_run_without_scaffold_refuses_a_correction() -> None:
    spec = loop.spec()
    start = loop.start(spec)

    with pytest.raises(ValueError, match="SCAFFOLD correction given to a trainer of a run without"):
        KerasTrainer(spec).fit(start, *loop.data(), epochs=1, seed=SEED, correction=start.weights)
