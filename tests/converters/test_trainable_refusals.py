"""Models the trainable TFLite artifact refuses (converters/trainable.py), each with one line
saying why: layers it cannot train, wrappers, outputs, graphs that are not one chain, bad
hyperparameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tensorflow_model_optimization as tfmot
import tf_keras
from keras_models import pruned_then_stripped

from fedprune.converters.trainable import build_trainable
from fedprune.coordinator import models
from fedprune.protocol.errors import ConfigError, ExportError

pytestmark = pytest.mark.slow

BATCH = 32
LR, MOMENTUM, ADAM_LR = 0.05, 0.9, 0.01
SPARSITY = 0.8
PARITY = 1e-5  # measured: <= 1.2e-6 (weights) and <= 4.8e-7 (losses) over one epoch
# BatchNormalization divides by the batch's deviation, which scales rounding up, and tf_keras runs
# a fused kernel on 4-D inputs: measured <= 1.2e-5 (weights) and <= 3.1e-6 (losses) over one epoch.
PARITY_OF = {"batch-norm": 5e-5}
Digits = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
layers = tf_keras.layers


def _sequential(*body: Any, input_shape: tuple[int, ...] = (8, 8, 1)) -> tf_keras.Model:
    return tf_keras.Sequential(
        [layers.Input(input_shape), *body, layers.Flatten(), layers.Dense(10, activation="softmax")]
    )


def _lstm() -> tf_keras.Model:
    return _sequential(layers.LSTM(4, name="lstm"), input_shape=(8, 8))


def _batch_renorm() -> tf_keras.Model:
    return _sequential(layers.BatchNormalization(renorm=True, name="bn"))


def _functional_batch_norm_on_rows() -> tf_keras.Model:
    """Issue 8: a Functional model got 'not a single chain' instead of the layer's own line."""
    x = inputs = layers.Input((8, 8, 1))
    x = layers.Conv2D(4, 3)(x)
    x = layers.BatchNormalization(axis=1, name="bn")(x)
    x = layers.Flatten()(x)
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x))


def _dilated() -> tf_keras.Model:
    return _sequential(layers.Conv2D(4, 3, dilation_rate=2, name="atrous"))


def _leaky() -> tf_keras.Model:
    return _sequential(layers.ReLU(negative_slope=0.1, name="leaky"))


def _relu4() -> tf_keras.Model:
    return _sequential(layers.ReLU(max_value=4.0, name="relu4"))


def _elu() -> tf_keras.Model:
    return _sequential(layers.Dense(4, activation="elu", name="dense_elu"), input_shape=(64,))


TAIL = (
    "is not supported by the litert trainer;"
    ' use the keras trainer (trainer = "keras" in the device profile)'
)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (_lstm, f"layer 'lstm' (LSTM) {TAIL}"),
        (_batch_renorm, f"layer 'bn' (BatchNormalization, renorm=True) {TAIL}"),
        (_functional_batch_norm_on_rows, f"layer 'bn' (BatchNormalization, axis=[1]) {TAIL}"),
        (_dilated, f"layer 'atrous' (Conv2D, dilation_rate=(2, 2)) {TAIL}"),
        (_leaky, f"layer 'leaky' (ReLU, negative_slope or threshold set) {TAIL}"),
        (_relu4, f"layer 'relu4' (ReLU, max_value=4 (6 or none)) {TAIL}"),
        (_elu, f"layer 'dense_elu' (Dense, activation 'elu') {TAIL}"),
    ],
    ids=[
        "lstm",
        "batch-renorm",
        "functional-batch-norm-axis",
        "dilated-conv",
        "leaky-relu",
        "relu-4",
        "elu",
    ],
)
def test_unsupported_layer_raises_one_line_error_naming_it(
    build: Callable[[], tf_keras.Model], message: str
) -> None:
    with pytest.raises(ExportError) as caught:
        build_trainable(build(), batch_size=BATCH, learning_rate=LR)

    assert str(caught.value) == message
    assert "\n" not in str(caught.value)


def test_model_with_pruning_wrappers_is_refused() -> None:
    model = tf_keras.Sequential([layers.Input((64,)), layers.Dense(10, activation="softmax")])
    schedule = tfmot.sparsity.keras.ConstantSparsity(SPARSITY, begin_step=0)
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)

    with pytest.raises(ExportError, match="is a pruning wrapper; strip the model first"):
        build_trainable(wrapped, batch_size=BATCH, learning_rate=LR)


def _functional_logits() -> tf_keras.Model:
    inputs = layers.Input((64,))
    hidden = layers.Dense(16, activation="relu")(inputs)
    return tf_keras.Model(inputs, layers.Dense(10, activation="linear")(hidden), name="logits")


@pytest.mark.parametrize(
    "build",
    [
        lambda: tf_keras.Sequential([layers.Input((64,)), layers.Dense(10)], name="logits"),
        _functional_logits,
        pruned_then_stripped(_functional_logits),
    ],
    ids=["sequential", "functional", "functional-stripped"],
)
def test_model_without_softmax_output_is_refused(build: Callable[[], tf_keras.Model]) -> None:
    with pytest.raises(ExportError) as caught:
        build_trainable(build(), batch_size=BATCH, learning_rate=LR)

    assert str(caught.value) == (
        "model 'logits' does not end in a softmax; the litert trainer needs one"
        ' (or use the keras trainer: trainer = "keras" in the device profile)'
    )


def _shared_layer() -> tf_keras.Model:
    inputs = layers.Input((64,))
    shared = layers.Dense(64, activation="relu", name="shared")
    x = shared(shared(inputs))
    return tf_keras.Model(inputs, layers.Dense(10, activation="softmax")(x), name="twice")


def _two_outputs() -> tf_keras.Model:
    inputs = layers.Input((64,))
    hidden = layers.Dense(16, activation="relu")(inputs)
    probs = layers.Dense(10, activation="softmax", name="probs")(hidden)
    return tf_keras.Model(inputs, [probs, layers.Dense(1, name="aux")(hidden)], name="heads")


def _two_inputs() -> tf_keras.Model:
    left, right = layers.Input((32,), name="left"), layers.Input((32,), name="right")
    x = layers.Concatenate()([left, right])
    return tf_keras.Model([left, right], layers.Dense(10, activation="softmax")(x), name="pair")


KERAS_INSTEAD = '(use the keras trainer: trainer = "keras" in the device profile)'


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            _shared_layer,
            "model 'twice' cannot be trained by the litert trainer:"
            " layer 'shared' (Dense) is used more than once",
        ),
        (
            _two_outputs,
            "model 'heads' cannot be trained by the litert trainer: it has 2 outputs"
            " ('probs', 'aux')",
        ),
        (
            _two_inputs,
            "model 'pair' cannot be trained by the litert trainer: it has 2 inputs"
            " ('left', 'right')",
        ),
    ],
    ids=["shared-layer", "two-outputs", "two-inputs"],
)
def test_a_graph_the_artifact_cannot_take_is_refused_naming_why(
    build: Callable[[], tf_keras.Model], message: str
) -> None:
    with pytest.raises(ExportError) as caught:
        build_trainable(build(), batch_size=BATCH, learning_rate=LR)

    assert str(caught.value) == f"{message} {KERAS_INSTEAD}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"optimizer": "rmsprop"}, "optimizer must be one of sgd, adam, got 'rmsprop'"),
        ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0, got 0.0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
        ({"prox_mu": -0.1}, "prox_mu must be finite and >= 0, got -0.1"),
        ({"prox_mu": float("nan")}, "prox_mu must be finite and >= 0, got nan"),
        ({"prox_mu": float("inf")}, "prox_mu must be finite and >= 0, got inf"),
    ],
)
def test_bad_hyperparameters_raise_config_error(kwargs: dict[str, Any], message: str) -> None:
    settings: dict[str, Any] = {"batch_size": BATCH, "learning_rate": LR} | kwargs

    with pytest.raises(ConfigError, match=message):
        build_trainable(models.build("mlp"), **settings)
