"""A 2:4 structured-pruned model (two zeros in every four weights) exports and runs in LiteRT."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tensorflow_model_optimization as tfmot
import tf_keras

from fedprune.converters import export_model
from fedprune.converters.strip import strip
from fedprune.device_profiles import DeviceProfile, Precision
from fedprune.edge_client.litert import load_interpreter, predict

Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_four(digits: Digits) -> tf_keras.Model:
    """A Dense 64-32-10 model, trained, wrapped for 2:4 sparsity, fine-tuned and stripped."""
    x_train, y_train, _, _ = digits
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential(
        [
            tf_keras.layers.Input((8, 8, 1)),
            tf_keras.layers.Flatten(),
            tf_keras.layers.Dense(32, activation="relu"),
            tf_keras.layers.Dense(10, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=5, batch_size=32, verbose=0)
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(model, sparsity_m_by_n=(2, 4))
    wrapped.compile("adam", "sparse_categorical_crossentropy")
    callbacks = [tfmot.sparsity.keras.UpdatePruningStep()]
    wrapped.fit(x_train, y_train, epochs=2, batch_size=32, verbose=0, callbacks=callbacks)
    return strip(wrapped)


def test_stripped_model_is_two_of_four_sparse(two_four: tf_keras.Model) -> None:
    for kernel in (w for w in two_four.get_weights() if w.ndim == 2):
        # TF-MOT groups four consecutive weights along the input axis of each output unit.
        zeros_per_group = (kernel.T.reshape(-1, 4) == 0).sum(axis=1)
        assert np.all(zeros_per_group >= 2)


@pytest.mark.parametrize("precision", list(Precision))
def test_two_four_model_exports_with_sparse_format_and_runs_in_litert(
    two_four: tf_keras.Model,
    digits: Digits,
    make_profile: Callable[..., DeviceProfile],
    tmp_path: Path,
    precision: Precision,
) -> None:
    _, _, x, y = digits
    profile = make_profile(
        name="two-four", precision=precision, sparse_format=True, accuracy_tolerance=0.02
    )

    report = export_model(two_four, profile, x=x, y=y, out_dir=tmp_path)

    assert report.weight_sparsity == pytest.approx(0.5, abs=0.001)
    assert report.keras_accuracy > 0.85
    assert report.tflite_accuracy >= report.keras_accuracy - 0.02
    assert report.sparse_format_bytes is not None
    assert report.tflite_bytes == min(report.dense_format_bytes, report.sparse_format_bytes)
    scores = predict(load_interpreter(report.model_path), x[:5])
    assert scores.shape == (5, 10)
    assert np.allclose(scores.sum(axis=1), 1.0, atol=0.02)
