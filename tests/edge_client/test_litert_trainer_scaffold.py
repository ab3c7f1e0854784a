"""The litert trainer in a SCAFFOLD run: a fit with a correction trains as the keras trainer's
does, and gives the same mean gradient (kept across the evaluation that follows a fit); an
artifact built without SCAFFOLD is refused in one line.

The artifact is built with TensorFlow, and the tests are skipped where it is missing.
"""

from __future__ import annotations

import dataclasses

import keras_loop as loop
import numpy as np
import pytest
from artifact_signatures import without

from fedprune.edge_client.litert_trainer import GET_GRADIENT, SET_CORRECTION, LiteRTTrainer
from fedprune.protocol.codec import Model
from fedprune.protocol.errors import ModelError
from fedprune.protocol.messages import Spec

EPOCHS, SEED = 2, 5
# Measured against the keras trainer: <= 1.2e-7 (weights) and 3.0e-8 (mean gradients)
PARITY = 1e-5


@pytest.fixture(scope="module")
def scaffold_run() -> tuple[Spec, bytes]:
    """keras_loop's model with BatchNormalization (SGD, momentum) in a SCAFFOLD run, and its
    training artifact built for SCAFFOLD."""
    tf_keras = pytest.importorskip("tf_keras")
    from fedprune.converters.trainable import build_trainable

    spec = loop.spec(scaffold=True)
    artifact = build_trainable(
        tf_keras.models.model_from_json(spec.model_json),
        batch_size=loop.BATCH,
        learning_rate=loop.LR,
        momentum=loop.MOMENTUM,
        scaffold=True,
    )
    return spec, artifact


def _correction(start: Model) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    return [
        (rng.normal(0, 0.3, w.shape) * (1 if m is None else m)).astype(np.float32)
        for w, m in zip(start.weights, start.masks, strict=True)
    ]


def test_a_corrected_fit_matches_the_keras_trainers_and_so_does_its_mean_gradient(
    scaffold_run: tuple[Spec, bytes],
) -> None:
    # Prepare
    from fedprune.edge_client.keras_trainer import KerasTrainer

    spec, artifact = scaffold_run
    start = loop.start(spec)
    correction = _correction(start)
    keras = KerasTrainer(spec)
    want = keras.fit(start, *loop.data(), epochs=EPOCHS, seed=SEED, correction=correction)
    plain = KerasTrainer(spec).fit(start, *loop.data(), epochs=EPOCHS, seed=SEED)
    trainer = LiteRTTrainer(spec, artifact=artifact)

    # Execute: fit, then evaluate (which sets weights again), then ask for the mean gradient
    got = trainer.fit(start, *loop.data(), epochs=EPOCHS, seed=SEED, correction=correction)
    trainer.evaluate(got, *loop.data(8))
    gradient = trainer.mean_gradient()

    # Assert
    assert loop.max_diff(got, want) < PARITY
    assert loop.max_diff(got, plain) > 1e-2
    assert loop.max_diff(gradient, keras.mean_gradient()) < PARITY
    assert min(float(np.abs(g).max()) for g in loop.trainable(spec, gradient)) > 1e-3


def test_a_fit_without_a_correction_after_one_with_is_uncorrected(
    scaffold_run: tuple[Spec, bytes],
) -> None:
    # Prepare: a trainer whose artifact kept a round's correction
    spec, artifact = scaffold_run
    start = loop.start(spec)
    used, fresh = LiteRTTrainer(spec, artifact=artifact), LiteRTTrainer(spec, artifact=artifact)
    used.fit(start, *loop.data(), epochs=1, seed=SEED, correction=_correction(start))

    # Execute
    got = used.fit(start, *loop.data(), epochs=1, seed=SEED)

    # Assert
    want = fresh.fit(start, *loop.data(), epochs=1, seed=SEED)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_an_artifact_built_without_scaffold_cannot_train_a_scaffold_run(
    scaffold_run: tuple[Spec, bytes],
) -> None:
    spec, artifact = scaffold_run
    old = without(artifact, SET_CORRECTION, GET_GRADIENT)
    LiteRTTrainer(dataclasses.replace(spec, scaffold=False), artifact=old)  # a run without: fine

    with pytest.raises(ModelError) as refused:
        LiteRTTrainer(spec, artifact=old)

    assert str(refused.value) == (
        "the training artifact has no set_correction and get_gradient signatures (built without"
        " SCAFFOLD): it cannot train this SCAFFOLD run"
    )
